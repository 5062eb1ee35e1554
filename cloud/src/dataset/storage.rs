//! Where the tables' files live: directories on the local disk (written with fsync and read in
//! place), or an S3 bucket through `object_store` (commits by conditional put, data files read
//! through a local cache: Delta's data files are never changed once written, so a cached copy
//! is always right).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::Duration;

use deltalake_core::DeltaTable;
use deltalake_core::logstore::{LogStoreRef, StorageConfig as DeltaStorage};
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use polars::prelude::*;

use super::{DataFile, DatasetError, Table, io, write_file};
use crate::config::StorageConfig;

/// Data files fetched at once into the cache.
const FETCHES_AT_ONCE: usize = 8;

/// The start check of a bucket's conditional writes: rounds, and writers that race to create
/// one new object in each.
const PROBE_ROUNDS: usize = 3;
const PROBE_WRITERS: usize = 8;

/// The dataset's storage.
pub(super) struct Storage {
    /// Local: the tables' directory. S3: the directory of the cache of their files.
    pub(super) dir: PathBuf,
    remote: Option<Remote>,
    /// fsync local files and log entries.
    fsync: bool,
    /// Cached files no snapshot named at the last prune: removed at the next one if still so
    /// (a query that listed one before it left the table may still be reading it).
    doomed: std::sync::Mutex<std::collections::BTreeSet<PathBuf>>,
}

/// A small document kept beside the tables (master data), as read.
#[derive(Debug, Clone)]
pub struct Document {
    /// Its content.
    pub bytes: Vec<u8>,
    /// What an update must find unchanged (on a bucket).
    version: Option<object_store::UpdateVersion>,
}

/// An S3 bucket.
struct Remote {
    /// The bucket's store (`/` at the bucket's root).
    store: Arc<dyn ObjectStore>,
    /// `s3://bucket/prefix/`.
    root: url::Url,
    /// The tables' prefix in the bucket (empty: the bucket's root).
    prefix: String,
    /// `storage.single_writer`: the conditional writes are not checked at start.
    single_writer: bool,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// delta-rs commits to an `s3://` table through its default log store (a log entry is put
/// only if it does not exist yet: S3's conditional writes), given the bucket's store.
struct S3LogStores;

impl deltalake_core::logstore::LogStoreFactory for S3LogStores {
    fn with_options(
        &self,
        prefixed: deltalake_core::logstore::ObjectStoreRef,
        root: deltalake_core::logstore::ObjectStoreRef,
        location: &url::Url,
        options: &DeltaStorage,
    ) -> deltalake_core::DeltaResult<LogStoreRef> {
        Ok(deltalake_core::logstore::default_logstore(
            prefixed, root, location, options,
        ))
    }
}

fn storage_err(table: &'static str, what: &str, e: impl std::fmt::Display) -> DatasetError {
    DatasetError::Storage {
        message: format!("table {table}: {what}: {e}"),
        retryable: true,
    }
}

impl Storage {
    /// The local disk: tables in `dir`.
    pub(super) fn local(dir: &Path, fsync: bool) -> Self {
        Self {
            dir: dir.to_owned(),
            remote: None,
            fsync,
            doomed: Default::default(),
        }
    }

    /// The bucket `cfg` names (credentials from the environment), with the cache of read files
    /// in `cache`. Nothing is sent yet: [`Storage::check`] does.
    pub(super) fn s3(cfg: &StorageConfig, cache: &Path) -> Result<Self, DatasetError> {
        let bad = |message: String| DatasetError::Storage {
            message,
            retryable: false,
        };
        let (bucket, prefix) = cfg
            .bucket()
            .map_err(bad)?
            .ok_or_else(|| bad("no url".into()))?;
        static REGISTER: Once = Once::new();
        REGISTER.call_once(|| {
            deltalake_core::logstore::logstore_factories().insert(
                url::Url::parse("s3://").expect("a URL"),
                Arc::new(S3LogStores),
            );
        });
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_allow_http(cfg.allow_http)
            // A store that does not answer is an error within seconds, not minutes: the edge
            // keeps the batch and tries again.
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(15),
                ..Default::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(60))
                    .with_allow_http(cfg.allow_http),
            );
        if let Some(r) = &cfg.region {
            b = b.with_region(r);
        }
        if let Some(e) = &cfg.endpoint {
            b = b.with_endpoint(e);
        }
        let store = b
            .build()
            .map_err(|e| bad(format!("S3 bucket {bucket}: {e}")))?;
        let root = if prefix.is_empty() {
            format!("s3://{bucket}/")
        } else {
            format!("s3://{bucket}/{prefix}/")
        };
        Ok(Self {
            dir: cache.to_owned(),
            remote: Some(Remote {
                store: Arc::new(store),
                root: url::Url::parse(&root).map_err(|e| bad(e.to_string()))?,
                prefix,
                single_writer: cfg.single_writer,
            }),
            fsync: false,
            doomed: Default::default(),
        })
    }

    /// Where the tables are, for people.
    pub(super) fn describe(&self) -> String {
        match &self.remote {
            Some(r) => r.root.to_string(),
            None => self.dir.display().to_string(),
        }
    }

    /// Whether the tables are on the local disk.
    pub(super) fn is_local(&self) -> bool {
        self.remote.is_none()
    }

    /// Makes sure the bucket answers (a clear error at start for wrong credentials, a missing
    /// bucket or an unreachable endpoint) and that its conditional writes are atomic, unless
    /// `storage.single_writer` says one node writes alone.
    pub(super) async fn check(&self) -> Result<(), DatasetError> {
        let Some(r) = &self.remote else {
            return Ok(());
        };
        let prefix = (!r.prefix.is_empty()).then(|| ObjectPath::from(r.prefix.as_str()));
        r.store
            .list_with_delimiter(prefix.as_ref())
            .await
            .map_err(|e| DatasetError::Storage {
                message: format!("cannot list {}: {}", r.root, explain(&e)),
                retryable: false,
            })?;
        if r.single_writer {
            tracing::info!(
                store = %r.root,
                "storage.single_writer: the store's conditional writes are not checked; only this node may write the dataset"
            );
            return Ok(());
        }
        self.check_conditional_writes(r).await
    }

    /// Delta's commits from several nodes are safe only if, of writers that race to create one
    /// object (`If-None-Match: *`), exactly one is told it did: a store that checks and then
    /// writes in two steps tells several, and their commits of one version overwrite each other
    /// (s3s-fs 0.14 does; S3, MinIO and R2 decide atomically). [`PROBE_WRITERS`] writers race
    /// for a new object, [`PROBE_ROUNDS`] times; the objects are deleted afterwards. A probe,
    /// not a proof: a store that fails it is certainly unsafe.
    async fn check_conditional_writes(&self, r: &Remote) -> Result<(), DatasetError> {
        use object_store::{PutMode, PutPayload};
        let base = if r.prefix.is_empty() {
            format!("_millrace/probe-{}", super::delta::unique())
        } else {
            format!("{}/_millrace/probe-{}", r.prefix, super::delta::unique())
        };
        for round in 1..=PROBE_ROUNDS {
            let key = ObjectPath::from(format!("{base}-{round}"));
            let puts = (0..PROBE_WRITERS).map(|i| {
                let (store, key) = (r.store.clone(), key.clone());
                async move {
                    let body = PutPayload::from(format!("millrace start check, writer {i}"));
                    store.put_opts(&key, body, PutMode::Create.into()).await
                }
            });
            let results = futures_util::future::join_all(puts).await;
            let _ = r.store.delete(&key).await;
            let mut told_yes = 0;
            for res in results {
                match res {
                    Ok(_) => told_yes += 1,
                    Err(
                        object_store::Error::AlreadyExists { .. }
                        | object_store::Error::Precondition { .. },
                    ) => {}
                    Err(e) => {
                        return Err(DatasetError::Storage {
                            message: format!("cannot write to {}: {}", r.root, explain(&e)),
                            retryable: false,
                        });
                    }
                }
            }
            if told_yes > 1 {
                return Err(DatasetError::Storage {
                    message: format!(
                        "the store at {} does not make conditional writes atomic: of {PROBE_WRITERS} writers racing to create one new object, {told_yes} were told they had (round {round} of {PROBE_ROUNDS}); Delta commits of several cloud nodes would overwrite each other and lose data. Use a store whose conditional writes are atomic (AWS S3, MinIO, Cloudflare R2), or set storage.single_writer = true if exactly one cloud node ever writes this dataset",
                        r.root
                    ),
                    retryable: false,
                });
            }
        }
        Ok(())
    }

    /// The table's URL (a local directory is made if missing).
    pub(super) fn table_url(&self, name: &'static str) -> Result<url::Url, DatasetError> {
        if let Some(r) = &self.remote {
            return r
                .root
                .join(&format!("{name}/"))
                .map_err(|e| storage_err(name, "table URL", e));
        }
        let path = self.dir.join(name);
        std::fs::create_dir_all(&path).map_err(io(&path))?;
        let path = path.canonicalize().map_err(io(&path))?;
        url::Url::from_directory_path(&path).map_err(|()| DatasetError::Delta {
            table: name,
            message: format!("{} is not an absolute path", path.display()),
            retryable: false,
        })
    }

    /// The log store of table `name` on a bucket (`None` on the local disk: delta-rs's own).
    pub(super) fn log_store(
        &self,
        name: &'static str,
    ) -> Result<Option<LogStoreRef>, DatasetError> {
        let Some(r) = &self.remote else {
            return Ok(None);
        };
        let url = self.table_url(name)?;
        deltalake_core::DeltaTableBuilder::from_url(url.clone())
            .and_then(|b| b.with_storage_backend(r.store.clone(), url).build_storage())
            .map(Some)
            .map_err(super::delta::delta_err(name))
    }

    /// Opens table `name`; `None` if it does not exist yet.
    pub(super) async fn load(
        &self,
        name: &'static str,
    ) -> Result<Option<DeltaTable>, DatasetError> {
        let opened = match &self.remote {
            None => {
                if !self.dir.join(name).join("_delta_log").exists() {
                    return Ok(None);
                }
                deltalake_core::open_table(self.table_url(name)?).await
            }
            Some(_) => {
                let mut t = DeltaTable::new(self.log_store(name)?.expect("remote"));
                t.load().await.map(|()| t)
            }
        };
        match opened {
            Ok(t) => Ok(Some(t)),
            Err(deltalake_core::DeltaTableError::NotATable(_)) => Ok(None),
            Err(e) => {
                let mut err = super::delta::delta_err(name)(e);
                if let (DatasetError::Delta { message, .. }, Some(version)) =
                    (&mut err, self.last_checkpoint(name).await)
                {
                    message.push_str(&format!(
                        "; opening reads the table's last checkpoint first: if \
                         `{name}/_delta_log/{version:020}.checkpoint.parquet` is damaged, \
                         remove it and `{name}/_delta_log/_last_checkpoint` and the table is \
                         read from an earlier checkpoint and the commits after it"
                    ));
                }
                Err(err)
            }
        }
    }

    /// The document `name` kept beside the tables (at the dataset's root, on a bucket under its
    /// prefix), with the version a [`Storage::put_document`] updates it from.
    pub(super) async fn get_document(&self, name: &str) -> Result<Option<Document>, DatasetError> {
        let Some(r) = &self.remote else {
            let path = self.dir.join(name);
            return match std::fs::read(&path) {
                Ok(bytes) => Ok(Some(Document {
                    bytes,
                    version: None,
                })),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io(&path)(e)),
            };
        };
        let key = r.doc_key(name);
        match r.store.get(&key).await {
            Ok(got) => {
                let version = object_store::UpdateVersion {
                    e_tag: got.meta.e_tag.clone(),
                    version: got.meta.version.clone(),
                };
                let bytes = got.bytes().await.map_err(|e| DatasetError::Storage {
                    message: format!("reading {key}: {}", explain(&e)),
                    retryable: true,
                })?;
                Ok(Some(Document {
                    bytes: bytes.to_vec(),
                    version: Some(version),
                }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(DatasetError::Storage {
                message: format!("reading {key}: {}", explain(&e)),
                retryable: true,
            }),
        }
    }

    /// Writes document `name` if it is still as `from` was read (`None`: if it does not exist);
    /// `false` if another node changed it meanwhile (read it again and retry). On the local
    /// disk (one node) it is written in place (temporary file, rename).
    pub(super) async fn put_document(
        &self,
        name: &str,
        bytes: Vec<u8>,
        from: Option<&Document>,
    ) -> Result<bool, DatasetError> {
        let Some(r) = &self.remote else {
            let path = self.dir.join(name);
            let tmp = path.with_extension("tmp");
            let written = std::fs::write(&tmp, &bytes)
                .and_then(|()| {
                    if self.fsync {
                        std::fs::File::open(&tmp)?.sync_all()?;
                    }
                    std::fs::rename(&tmp, &path)
                })
                .map_err(io(&path));
            return written.map(|()| true);
        };
        let key = r.doc_key(name);
        let mode = match from.and_then(|d| d.version.clone()) {
            Some(v) => object_store::PutMode::Update(v),
            None => object_store::PutMode::Create,
        };
        let put = r.store.put_opts(&key, bytes.into(), mode.into()).await;
        match put {
            Ok(_) => Ok(true),
            Err(
                object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. },
            ) => Ok(false),
            Err(e) => Err(DatasetError::Storage {
                message: format!("writing {key}: {}", explain(&e)),
                retryable: true,
            }),
        }
    }

    /// The version of table `name`'s last checkpoint, if `_last_checkpoint` names one.
    async fn last_checkpoint(&self, name: &str) -> Option<u64> {
        #[derive(serde::Deserialize)]
        struct LastCheckpoint {
            version: u64,
        }
        let bytes = match &self.remote {
            None => std::fs::read(self.dir.join(name).join("_delta_log/_last_checkpoint")).ok()?,
            Some(r) => {
                let key = r.key(name, "_delta_log/_last_checkpoint");
                r.store.get(&key).await.ok()?.bytes().await.ok()?.to_vec()
            }
        };
        serde_json::from_slice::<LastCheckpoint>(&bytes)
            .ok()
            .map(|c| c.version)
    }

    /// Makes a committed log entry durable on a local disk (object stores are).
    pub(super) fn fsync_log(&self, name: &str, version: Option<u64>) -> Result<(), DatasetError> {
        if !self.fsync || self.remote.is_some() {
            return Ok(());
        }
        let log = self.dir.join(name).join("_delta_log");
        if let Some(v) = version {
            let p = log.join(format!("{v:020}.json"));
            if let Ok(f) = std::fs::File::open(&p) {
                f.sync_all().map_err(io(&p))?;
            }
        }
        super::sync_dir(&log)?;
        super::sync_dir(&self.dir.join(name))
    }

    /// Writes `df` as the new data file `rel` of table `name` (durable when this returns);
    /// returns its size.
    pub(super) fn put(
        &self,
        rt: &tokio::runtime::Runtime,
        name: &'static str,
        rel: &str,
        df: &mut DataFrame,
    ) -> Result<u64, DatasetError> {
        let path = self.dir.join(name).join(rel);
        let Some(r) = &self.remote else {
            write_file(&path, df, self.fsync)?;
            return Ok(std::fs::metadata(&path).map_err(io(&path))?.len());
        };
        let mut bytes = Vec::with_capacity(1 << 16);
        super::parquet_writer(&mut bytes, name == Table::Events.as_str()).finish(df)?;
        let size = bytes.len() as u64;
        let key = r.key(name, rel);
        let body = bytes::Bytes::from(bytes);
        super::delta::block_on(rt, r.store.put(&key, body.clone().into()))
            .map_err(|e| storage_err(name, &format!("writing {key}"), explain(&e)))?;
        // The cache keeps what this node wrote: its reports need no download of it.
        let _ = cache_file(&path, &body);
        Ok(size)
    }

    /// Removes data file `rel` of table `name` (a commit that failed).
    pub(super) fn delete(&self, rt: &tokio::runtime::Runtime, name: &str, rel: &str) {
        let path = self.dir.join(name).join(rel);
        let _ = std::fs::remove_file(&path);
        if let Some(r) = &self.remote {
            let key = r.key(name, rel);
            if let Err(e) = super::delta::block_on(rt, r.store.delete(&key)) {
                tracing::warn!(file = %key, error = %explain(&e), "could not delete a file no commit names; vacuum will");
            }
        }
    }

    /// Local paths of `files` (relative to the dataset's root) to read: in place on the local
    /// disk; on a bucket, in the cache, fetched first if missing.
    pub(super) fn read_paths(
        &self,
        rt: &tokio::runtime::Runtime,
        files: &[DataFile],
    ) -> Result<Vec<PathBuf>, DatasetError> {
        let paths: Vec<PathBuf> = files.iter().map(|f| self.dir.join(&f.path)).collect();
        let Some(r) = &self.remote else {
            return Ok(paths);
        };
        // Owned work items: the fetches run on the dataset's runtime.
        let missing: Vec<(ObjectPath, PathBuf, &'static str)> = files
            .iter()
            .zip(&paths)
            .filter(|(_, p)| !p.exists())
            .map(|(f, p)| {
                let key = if r.prefix.is_empty() {
                    f.path.clone()
                } else {
                    format!("{}/{}", r.prefix, f.path)
                };
                (ObjectPath::from(key), p.clone(), f.table.as_str())
            })
            .collect();
        if missing.is_empty() {
            return Ok(paths);
        }
        let started = std::time::Instant::now();
        let n = missing.len();
        let store = r.store.clone();
        let fetches = futures_util::stream::iter(missing)
            .map(move |(key, p, table)| {
                let store = store.clone();
                async move {
                    let got = async { store.get(&key).await?.bytes().await }.await;
                    let body = got
                        .map_err(|e| storage_err(table, &format!("reading {key}"), explain(&e)))?;
                    cache_file(&p, &body).map_err(io(&p))?;
                    Ok::<u64, DatasetError>(body.len() as u64)
                }
            })
            .buffer_unordered(FETCHES_AT_ONCE)
            .try_fold(0u64, |a, b| async move { Ok(a + b) });
        let fetched: Result<u64, DatasetError> = super::delta::block_on(rt, fetches);
        let bytes = fetched?;
        metrics::counter!("millrace_cloud_cache_fetched_bytes_total").increment(bytes);
        tracing::debug!(
            files = n,
            bytes,
            ms = started.elapsed().as_millis() as u64,
            "data files fetched into the cache"
        );
        Ok(paths)
    }

    /// Removes cached files that no current snapshot names (`live`: paths relative to the
    /// dataset's root) and that no snapshot named at the previous call either (called once per
    /// vacuum pass: a query reading one has had a pass's time to finish). Returns how many.
    pub(super) fn prune_cache(&self, live: &std::collections::BTreeSet<String>) -> usize {
        if self.remote.is_none() {
            return 0;
        }
        let dead: std::collections::BTreeSet<PathBuf> = walk(&self.dir)
            .into_iter()
            .filter(|p| {
                p.strip_prefix(&self.dir).is_ok_and(|rel| {
                    let rel = rel.to_string_lossy().replace('\\', "/");
                    rel.ends_with(".parquet") && !live.contains(&rel)
                })
            })
            .collect();
        let mut doomed = self.doomed.lock().expect("cache lock");
        let removed = dead
            .intersection(&doomed)
            .filter(|p| std::fs::remove_file(p).is_ok())
            .count();
        *doomed = dead;
        removed
    }
}

impl Remote {
    /// A document's key: `name` under the prefix.
    fn doc_key(&self, name: &str) -> ObjectPath {
        ObjectPath::from(if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}/{name}", self.prefix)
        })
    }

    fn key(&self, name: &str, rel: &str) -> ObjectPath {
        ObjectPath::from(if self.prefix.is_empty() {
            format!("{name}/{rel}")
        } else {
            format!("{}/{name}/{rel}", self.prefix)
        })
    }
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Writes a cached copy: temp file, rename (a reader never sees half a file).
fn cache_file(path: &Path, body: &[u8]) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension(format!("{}.tmp", super::delta::unique()));
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// An object store error in words an operator acts on.
fn explain(e: &object_store::Error) -> String {
    let text = e.to_string();
    let hint = if text.contains("NoSuchBucket") {
        " (the bucket does not exist: create it, or correct storage.url)"
    } else if text.contains("InvalidAccessKeyId")
        || text.contains("SignatureDoesNotMatch")
        || text.contains("AccessDenied")
        || text.contains("403")
    {
        " (the credentials were refused: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's policy)"
    } else if text.contains("error sending request") || text.contains("connect") {
        " (the endpoint does not answer: check storage.endpoint and the network)"
    } else {
        ""
    };
    format!("{text}{hint}")
}
