//! `millrace-powercut-fs BACKING MOUNTPOINT`: mounts a layer over the directory `BACKING` at
//! `MOUNTPOINT` that passes everything through and remembers, per file, what it held at its last
//! sync. It prints `mounted` when the mount is up, then reads commands on stdin:
//!
//! - `cut`: the power goes. Every write no sync covered is undone in `BACKING`, the layer is
//!   unmounted, and it prints one `lost\t<bytes>\t<path>` line per file that lost data and a last
//!   line `cut\t<bytes>\t<syncs>`. Kill the program under test first: nothing it does after
//!   the moment of the cut may reach the disk.
//! - end of input: a clean unmount, nothing undone.

mod fs;

use std::io::BufRead;
use std::path::PathBuf;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [backing, mountpoint] = args.as_slice() else {
        eprintln!("usage: millrace-powercut-fs BACKING MOUNTPOINT");
        return std::process::ExitCode::from(2);
    };
    let layer = match fs::PowerCut::mount(&PathBuf::from(backing), &PathBuf::from(mountpoint)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "millrace-powercut-fs: cannot mount {mountpoint}: {e} (FUSE needs root and /dev/fuse)"
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("mounted");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "cut" {
            return match layer.cut() {
                Ok(report) => {
                    for (path, bytes) in &report.files {
                        println!("lost\t{bytes}\t{}", path.display());
                    }
                    println!("cut\t{}\t{}", report.bytes, report.syncs);
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("millrace-powercut-fs: the cut failed: {e}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        eprintln!("millrace-powercut-fs: unknown command {line:?} (cut, or end of input)");
    }
    drop(layer);
    std::process::ExitCode::SUCCESS
}
