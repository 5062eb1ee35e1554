//! The layer: a FUSE filesystem that can lose power ([`PowerCutFs`]).
//!
//! It passes every operation through to a backing directory, and for each file it remembers
//! what the file held when it was last made durable (`fsync`/`fdatasync`, or a write through
//! `O_SYNC`/`O_DSYNC`): its length then, and the old bytes of every range written since. A
//! [`PowerCut::cut`] puts every file back to that state — every write the program did not sync
//! is gone, as after a power loss with a cold page cache — and unmounts. Directory operations
//! (create, rename, unlink) are kept: the layer models lost *data*, not lost directory entries.
//!
//! The program under test must be dead (kill -9) before the cut: the cut stands for the moment
//! the power went, and nothing after it may reach the disk.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::FallocateFlags;

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    WriteFlags,
};

/// How long the kernel may cache names and attributes: short, as every change comes through us.
const TTL: Duration = Duration::from_secs(1);

/// What a cut took away.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Files that had writes no sync covered, with the bytes they lost (written ranges put back
    /// plus length cut off), by path relative to the backing directory.
    pub files: Vec<(PathBuf, u64)>,
    /// All bytes lost.
    pub bytes: u64,
    /// Syncs (`fsync`, `fdatasync`) the layer saw while it was mounted.
    pub syncs: u64,
}

/// A mounted [`PowerCutFs`]; [`cut`](Self::cut) it to lose power. Dropping it without a cut
/// unmounts and keeps everything (a clean shutdown).
#[derive(Debug)]
pub struct PowerCut {
    state: Arc<Mutex<State>>,
    session: Option<fuser::BackgroundSession>,
    backing: PathBuf,
}

impl PowerCut {
    /// Mounts a layer over `backing` at `mountpoint` (both directories; needs root or
    /// `/dev/fuse` access).
    ///
    /// # Errors
    /// When FUSE cannot be mounted.
    pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(backing)?;
        std::fs::create_dir_all(mountpoint)?;
        let backing = backing.canonicalize()?;
        let root_ino = std::fs::metadata(&backing)?.ino();
        let state = Arc::new(Mutex::new(State {
            root_ino,
            paths: HashMap::from([(INodeNo::ROOT.0, backing.clone())]),
            handles: HashMap::new(),
            next_fh: 1,
            pending: HashMap::new(),
            syncs: 0,
            dead: false,
        }));
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("millrace-powercut".into()),
            MountOption::DefaultPermissions,
        ];
        let session = fuser::spawn_mount(
            PowerCutFs {
                state: state.clone(),
            },
            mountpoint,
            &config,
        )?;
        Ok(Self {
            state,
            session: Some(session),
            backing,
        })
    }

    /// Loses power: every write since its file's last sync is undone in the backing directory,
    /// further operations fail with EIO, and the layer is unmounted. Returns what was lost.
    ///
    /// # Errors
    /// When the backing files cannot be put back.
    pub fn cut(mut self) -> io::Result<CutReport> {
        let report = {
            let mut s = lock(&self.state);
            s.dead = true;
            let pending = std::mem::take(&mut s.pending);
            let mut report = CutReport {
                syncs: s.syncs,
                ..CutReport::default()
            };
            for (ino, p) in pending {
                let Some(path) = s.paths.get(&ino) else {
                    continue; // unlinked: nothing of it is left to restore
                };
                let file = OpenOptions::new().write(true).open(path)?;
                let len = file.metadata()?.len();
                let mut lost = len.saturating_sub(p.synced_len);
                for (offset, old) in p.overwrites.iter().rev() {
                    file.write_all_at(old, *offset)?;
                    lost += old.len() as u64;
                }
                file.set_len(p.synced_len)?;
                if lost > 0 {
                    let rel = path.strip_prefix(&self.backing).unwrap_or(path);
                    report.files.push((rel.to_owned(), lost));
                    report.bytes += lost;
                }
            }
            report.files.sort();
            report
        };
        if let Some(session) = self.session.take() {
            session.umount_and_join()?;
        }
        Ok(report)
    }
}

impl Drop for PowerCut {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = session.umount_and_join();
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What must be undone for one file at a cut.
#[derive(Debug)]
struct Pending {
    /// The file's length at its last sync.
    synced_len: u64,
    /// Old bytes of ranges below `synced_len` overwritten since, in the order written.
    overwrites: Vec<(u64, Vec<u8>)>,
}

#[derive(Debug)]
struct State {
    /// The backing directory's own inode number (FUSE calls it 1).
    root_ino: u64,
    /// Inode → path in the backing directory.
    paths: HashMap<u64, PathBuf>,
    /// Open files: handle → (inode, file, written through O_SYNC/O_DSYNC).
    handles: HashMap<u64, (u64, File, bool)>,
    next_fh: u64,
    pending: HashMap<u64, Pending>,
    syncs: u64,
    dead: bool,
}

impl State {
    fn ino_of(&self, md: &Metadata) -> u64 {
        if md.ino() == self.root_ino {
            INodeNo::ROOT.0
        } else {
            md.ino()
        }
    }

    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        if self.dead {
            return Err(Errno::EIO);
        }
        self.paths.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path(parent)?.join(name))
    }

    /// Looks a path up and remembers it under its inode.
    fn entry(&mut self, path: PathBuf) -> Result<FileAttr, Errno> {
        let md = std::fs::symlink_metadata(&path)?;
        let ino = self.ino_of(&md);
        self.paths.insert(ino, path);
        Ok(attr(ino, &md))
    }

    fn handle(&self, fh: FileHandle) -> Result<&(u64, File, bool), Errno> {
        if self.dead {
            return Err(Errno::EIO);
        }
        self.handles.get(&fh.0).ok_or(Errno::EBADF)
    }

    fn open_handle(&mut self, ino: u64, file: File, flags: i32) -> FileHandle {
        let fh = self.next_fh;
        self.next_fh += 1;
        let synced = flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
        self.handles.insert(fh, (ino, file, synced));
        FileHandle(fh)
    }

    /// Before `file` (inode `ino`) changes in `[offset, offset + len)` or its length changes:
    /// keeps what a cut needs to put it back.
    fn before_change(&mut self, ino: u64, file: &File, offset: u64, len: u64) -> io::Result<()> {
        let current = file.metadata()?.len();
        let p = self.pending.entry(ino).or_insert(Pending {
            synced_len: current,
            overwrites: Vec::new(),
        });
        let end = (offset + len).min(p.synced_len).min(current);
        if offset < end {
            let mut old = vec![0u8; usize::try_from(end - offset).expect("fits")];
            file.read_exact_at(&mut old, offset)?;
            p.overwrites.push((offset, old));
        }
        Ok(())
    }

    /// Forgets an inode whose last name went away.
    fn forget_path(&mut self, path: &Path) {
        if let Ok(md) = std::fs::symlink_metadata(path)
            && md.nlink() <= 1
        {
            let ino = self.ino_of(&md);
            self.paths.remove(&ino);
            self.pending.remove(&ino);
        }
    }
}

fn attr(ino: u64, md: &Metadata) -> FileAttr {
    let time = |secs: i64, nsecs: i64| {
        UNIX_EPOCH
            + Duration::new(
                u64::try_from(secs).unwrap_or(0),
                u32::try_from(nsecs).unwrap_or(0),
            )
    };
    FileAttr {
        ino: INodeNo(ino),
        size: md.len(),
        blocks: md.blocks(),
        atime: time(md.atime(), md.atime_nsec()),
        mtime: time(md.mtime(), md.mtime_nsec()),
        ctime: time(md.ctime(), md.ctime_nsec()),
        crtime: SystemTime::UNIX_EPOCH,
        kind: FileType::from_std(md.file_type()).unwrap_or(FileType::RegularFile),
        perm: u16::try_from(md.mode() & 0o7777).unwrap_or(0o644),
        nlink: u32::try_from(md.nlink()).unwrap_or(1),
        uid: md.uid(),
        gid: md.gid(),
        rdev: u32::try_from(md.rdev()).unwrap_or(0),
        blksize: 4096,
        flags: 0,
    }
}

/// The filesystem the kernel talks to; all state is shared with [`PowerCut`].
struct PowerCutFs {
    state: Arc<Mutex<State>>,
}

impl PowerCutFs {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Filesystem for PowerCutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut s = self.state();
        match s.child(parent, name).and_then(|p| s.entry(p)) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let s = self.state();
        let md = match fh {
            Some(fh) => s
                .handle(fh)
                .and_then(|h| h.1.metadata().map_err(Errno::from)),
            None => s
                .path(ino)
                .and_then(|p| std::fs::symlink_metadata(p).map_err(Errno::from)),
        };
        match md {
            Ok(md) => reply.attr(&TTL, &attr(ino.0, &md)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.state();
        let result = (|| -> Result<Metadata, Errno> {
            let path = s.path(ino)?;
            if let Some(mode) = mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            }
            if let Some(size) = size {
                let file = OpenOptions::new().write(true).open(&path)?;
                let current = file.metadata()?.len();
                if size < current {
                    s.before_change(ino.0, &file, size, current - size)?;
                } else {
                    s.before_change(ino.0, &file, current, 0)?;
                }
                file.set_len(size)?;
            }
            Ok(std::fs::symlink_metadata(&path)?)
        })();
        match result {
            Ok(md) => reply.attr(&TTL, &attr(ino.0, &md)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.state();
        let result = s.child(parent, name).and_then(|p| {
            std::fs::create_dir(&p)?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode & !umask))?;
            s.entry(p)
        });
        match result {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.state();
        let result = s.child(parent, name).and_then(|p| {
            s.forget_path(&p);
            Ok(std::fs::remove_file(&p)?)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.state();
        let result = s.child(parent, name).and_then(|p| {
            s.forget_path(&p);
            Ok(std::fs::remove_dir(&p)?)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.bits() != 0 {
            return reply.error(Errno::EINVAL);
        }
        let mut s = self.state();
        let result = (|| -> Result<(), Errno> {
            let from = s.child(parent, name)?;
            let to = s.child(newparent, newname)?;
            s.forget_path(&to);
            std::fs::rename(&from, &to)?;
            // Everything known under the old name now lives under the new one.
            for p in s.paths.values_mut() {
                if let Ok(rest) = p.strip_prefix(&from) {
                    *p = if rest.as_os_str().is_empty() {
                        to.clone()
                    } else {
                        to.join(rest)
                    };
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut s = self.state();
        let result = (|| -> Result<FileHandle, Errno> {
            let path = s.path(ino)?;
            let file = open_backing(&path)?;
            if flags.0 & libc::O_TRUNC != 0 {
                let len = file.metadata()?.len();
                s.before_change(ino.0, &file, 0, len)?;
                file.set_len(0)?;
            }
            Ok(s.open_handle(ino.0, file, flags.0))
        })();
        match result {
            Ok(fh) => reply.opened(fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.state();
        let result = (|| -> Result<(FileAttr, FileHandle), Errno> {
            let path = s.child(parent, name)?;
            let existed = path.exists();
            let mut o = OpenOptions::new();
            o.read(true).write(true).create(true).mode(mode & !umask);
            if flags & libc::O_EXCL != 0 {
                o.create_new(true);
            }
            let file = o.open(&path)?;
            let a = s.entry(path)?;
            if !existed {
                // A new file: nothing of it is durable until it is synced.
                s.pending.insert(
                    a.ino.0,
                    Pending {
                        synced_len: 0,
                        overwrites: Vec::new(),
                    },
                );
            }
            if flags & libc::O_TRUNC != 0 && existed {
                s.before_change(a.ino.0, &file, 0, a.size)?;
                file.set_len(0)?;
            }
            let fh = s.open_handle(a.ino.0, file, flags);
            Ok((a, fh))
        })();
        match result {
            Ok((a, fh)) => reply.created(&TTL, &a, Generation(0), fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let s = self.state();
        let result = s.handle(fh).and_then(|(_, file, _)| {
            let mut buf = vec![0u8; size as usize];
            let mut got = 0;
            while got < buf.len() {
                match file.read_at(&mut buf[got..], offset + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Errno::from(e)),
                }
            }
            buf.truncate(got);
            Ok(buf)
        });
        match result {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.state();
        let result = (|| -> Result<(), Errno> {
            let (ino, file, synced) = s.handle(fh)?;
            let (ino, synced) = (*ino, *synced);
            let file = file.try_clone()?;
            if synced {
                // O_SYNC/O_DSYNC: durable when the write returns.
                file.write_all_at(data, offset)?;
                s.pending.remove(&ino);
            } else {
                s.before_change(ino, &file, offset, data.len() as u64)?;
                file.write_all_at(data, offset)?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => reply.written(u32::try_from(data.len()).expect("a FUSE write fits u32")),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok(); // close(2) makes nothing durable
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state().handles.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        if s.dead {
            return reply.error(Errno::EIO);
        }
        // The backing file itself need not reach its disk: the cut, not the machine, decides
        // what a power loss takes.
        s.pending.remove(&ino.0);
        s.syncs += 1;
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut s = self.state();
        let result = (|| -> Result<Vec<(u64, FileType, std::ffi::OsString)>, Errno> {
            let path = s.path(ino)?;
            let mut entries = vec![
                (ino.0, FileType::Directory, ".".into()),
                (ino.0, FileType::Directory, "..".into()),
            ];
            for e in std::fs::read_dir(&path)? {
                let e = e?;
                let md = e.metadata()?;
                let child = s.ino_of(&md);
                s.paths.insert(child, e.path());
                let kind = FileType::from_std(md.file_type()).unwrap_or(FileType::RegularFile);
                entries.push((child, kind, e.file_name()));
            }
            Ok(entries)
        })();
        match result {
            Ok(entries) => {
                let skip = usize::try_from(offset).unwrap_or(usize::MAX);
                for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(skip) {
                    if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok(); // directory operations are kept anyway
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let s = self.state();
        let result = s
            .path(ino)
            .and_then(|p| nix::sys::statvfs::statvfs(&p).map_err(|e| Errno::from_i32(e as i32)));
        match result {
            Ok(st) => reply.statfs(
                st.blocks(),
                st.blocks_free(),
                st.blocks_available(),
                st.files(),
                st.files_free(),
                u32::try_from(st.block_size()).unwrap_or(4096),
                u32::try_from(st.name_max()).unwrap_or(255),
                u32::try_from(st.fragment_size()).unwrap_or(4096),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        let result = (|| -> Result<(), Errno> {
            let (ino, file, _) = s.handle(fh)?;
            let ino = *ino;
            let file = file.try_clone()?;
            match mode {
                0 => s.before_change(ino, &file, offset, 0)?, // may grow the file
                libc::FALLOC_FL_KEEP_SIZE => {}               // space only, no content
                _ => return Err(Errno::EOPNOTSUPP),
            }
            let (off, len) = (
                i64::try_from(offset).map_err(|_| Errno::EINVAL)?,
                i64::try_from(length).map_err(|_| Errno::EINVAL)?,
            );
            nix::fcntl::fallocate(&file, FallocateFlags::from_bits_truncate(mode), off, len)
                .map_err(|e| Errno::from_i32(e as i32))?;
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

/// Opens a backing file for reading and writing whatever `open(2)` asked for: the layer reads
/// what a write replaces, and handles creation, truncation and append itself (the kernel gives
/// every write its offset).
fn open_backing(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}
