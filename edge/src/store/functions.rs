//! What functions keep in the store: their specs and modules, their key-value state, the
//! invocation log and the alerts they raised.
//!
//! | CF | key | value |
//! |---|---|---|
//! | `functions` | `s/{name}` | the function's spec (JSON, owned by [`crate::functions`]) |
//! | `functions` | `m/{name}\0` · version `u32` | the module's bytes |
//! | `functions` | `c/{name}` | its cursor in the trigger log ([`super::triggers`]) |
//! | `functions` | `p/{name}` | its last replay's progress (JSON, owned by the functions module) |
//! | `functions` | `r/{name}` | when its last scheduled run that ended was fired (ms `i64`) |
//! | `kv` | `{name}\0{key}` | a value a function stored |
//! | `invocations` | newest start ts · counter `u64` | a batch of invocation records (JSON lines, zstd) |
//! | `alerts` | ts · counter `u64` | alert (JSON, [`millrace_shared::Alert`]); also queued in the outbox |
//!
//! The values are opaque bytes here; the functions module owns their schemas.

use rocksdb::{IteratorMode, ReadOptions, WriteBatch, WriteOptions};

use super::{CF_ALERTS, CF_FUNCTIONS, CF_INVOCATIONS, CF_KV, CF_OUTBOX, Store, StoreError, ts_key};

fn spec_key(name: &str) -> Vec<u8> {
    format!("s/{name}").into_bytes()
}

fn schedule_key(name: &str) -> Vec<u8> {
    format!("r/{name}").into_bytes()
}

fn replay_key(name: &str) -> Vec<u8> {
    format!("p/{name}").into_bytes()
}

fn module_prefix(name: &str) -> Vec<u8> {
    format!("m/{name}\0").into_bytes()
}

fn kv_key(name: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 1 + key.len());
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

/// The end of the range of keys starting with `prefix` (prefix + 1 in its last byte).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    // The prefixes here end in a 0 separator or an ASCII byte: never 0xff.
    *end.last_mut().expect("non-empty prefix") += 1;
    end
}

/// One change to a function's key-value state (`None` deletes).
pub type KvWrite = (Vec<u8>, Option<Vec<u8>>);

/// One entry of a function's key-value state.
pub type KvEntry = (Vec<u8>, Vec<u8>);

impl Store {
    fn write_opts(&self) -> WriteOptions {
        let mut wo = WriteOptions::default();
        wo.set_sync(self.opts.sync_writes);
        wo
    }

    /// Every stored function spec, by name.
    pub fn function_specs(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.per_function(b's')
    }

    /// Every `{tag}/{name}` record of the `functions` family, by name.
    pub(super) fn per_function(&self, tag: u8) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_range(vec![tag, b'/']..vec![tag, b'0']);
        let mut out = vec![];
        for item in self
            .db
            .iterator_cf_opt(self.cf(CF_FUNCTIONS), ro, IteratorMode::Start)
        {
            let (k, v) = item?;
            out.push((String::from_utf8_lossy(&k[2..]).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    /// The bytes of one version of a function's module.
    pub fn function_module(&self, name: &str, version: u32) -> Result<Option<Vec<u8>>, StoreError> {
        let mut k = module_prefix(name);
        k.extend_from_slice(&version.to_be_bytes());
        Ok(self.db.get_cf(self.cf(CF_FUNCTIONS), k)?)
    }

    /// Stores a function's spec and, with `module`, a new version of its module; keeps the
    /// modules of the newest `keep_versions` versions.
    pub fn put_function(
        &self,
        name: &str,
        spec: &[u8],
        module: Option<(u32, &[u8])>,
        keep_versions: u32,
    ) -> Result<(), StoreError> {
        let cf = self.cf(CF_FUNCTIONS);
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, spec_key(name), spec);
        if let Some((version, bytes)) = module {
            let prefix = module_prefix(name);
            let mut k = prefix.clone();
            k.extend_from_slice(&version.to_be_bytes());
            batch.put_cf(cf, k, bytes);
            let oldest_kept = version.saturating_sub(keep_versions.max(1) - 1);
            let mut end = prefix.clone();
            end.extend_from_slice(&oldest_kept.to_be_bytes());
            batch.delete_range_cf(cf, prefix, end);
        }
        self.db.write_opt(batch, &self.write_opts())?;
        Ok(())
    }

    /// Deletes a function: its spec, modules, key-value state and trigger cursor.
    pub fn delete_function(&self, name: &str) -> Result<(), StoreError> {
        self.close_function_cursor(name)?;
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_FUNCTIONS), spec_key(name));
        batch.delete_cf(self.cf(CF_FUNCTIONS), schedule_key(name));
        batch.delete_cf(self.cf(CF_FUNCTIONS), replay_key(name));
        let m = module_prefix(name);
        batch.delete_range_cf(self.cf(CF_FUNCTIONS), m.clone(), prefix_end(&m));
        let kv = kv_key(name, b"");
        batch.delete_range_cf(self.cf(CF_KV), kv.clone(), prefix_end(&kv));
        self.db.write_opt(batch, &self.write_opts())?;
        Ok(())
    }

    /// When the function's last scheduled run that ended was fired (it covered every due
    /// time up to then).
    pub fn schedule_mark(&self, name: &str) -> Result<Option<i64>, StoreError> {
        let v = self.db.get_cf(self.cf(CF_FUNCTIONS), schedule_key(name))?;
        Ok(v.and_then(|v| {
            <[u8; 8]>::try_from(v.as_slice())
                .ok()
                .map(i64::from_be_bytes)
        }))
    }

    /// Adds "the scheduled run fired at `due_ms` ended" to a batch.
    pub(super) fn put_schedule_mark(&self, batch: &mut WriteBatch, name: &str, due_ms: i64) {
        batch.put_cf(
            self.cf(CF_FUNCTIONS),
            schedule_key(name),
            due_ms.to_be_bytes(),
        );
    }

    /// Every function's last replay progress, by name.
    pub fn replays(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.per_function(b'p')
    }

    /// Adds a replay's progress to a batch.
    pub(super) fn put_replay(&self, batch: &mut WriteBatch, name: &str, progress: &[u8]) {
        batch.put_cf(self.cf(CF_FUNCTIONS), replay_key(name), progress);
    }

    /// A value from a function's key-value state.
    pub fn kv_get(&self, name: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(CF_KV), kv_key(name, key))?)
    }

    /// Up to `limit` entries of a function's key-value state whose keys start with `prefix`,
    /// in key order.
    pub fn kv_scan(
        &self,
        name: &str,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<KvEntry>, StoreError> {
        let start = kv_key(name, prefix);
        let end = prefix_end(&kv_key(name, b""));
        let mut ro = ReadOptions::default();
        ro.set_iterate_range(start.clone()..end);
        let skip = name.len() + 1;
        let mut out = vec![];
        for item in self
            .db
            .iterator_cf_opt(self.cf(CF_KV), ro, IteratorMode::Start)
        {
            let (k, v) = item?;
            if !k[skip..].starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k[skip..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Adds key-value writes and alerts to a write batch. Each alert is also queued in the
    /// outbox (when there is one) for the cloud, marked as backfill if `backfill`.
    pub(super) fn put_function_state(
        &self,
        batch: &mut WriteBatch,
        name: &str,
        kv: &[KvWrite],
        alerts: &[(i64, Vec<u8>)],
        backfill: bool,
        mut outbox: Option<&mut super::outbox::PendingRecords>,
    ) {
        for (k, v) in kv {
            match v {
                Some(v) => batch.put_cf(self.cf(CF_KV), kv_key(name, k), v),
                None => batch.delete_cf(self.cf(CF_KV), kv_key(name, k)),
            }
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut record = vec![];
        for (ts, a) in alerts {
            let mut k = ts_key(*ts).to_vec();
            k.extend_from_slice(&self.log_counter().to_be_bytes());
            batch.put_cf(self.cf(CF_ALERTS), k, a);
            if let Some(ob) = outbox.as_deref_mut() {
                let seq = ob.next_seq();
                record.clear();
                millrace_shared::sync::encode_alert_record(&mut record, seq, now_ms, backfill, a);
                ob.put_alert(batch, self.cf(CF_OUTBOX), seq, &record);
            }
        }
    }

    fn log_counter(&self) -> u64 {
        self.log_counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Appends a batch of invocation records (JSON each, in the order they finished) as one
    /// zstd-compressed value keyed by the newest record's start time. Not synced: the log is
    /// diagnostics, and losing its last second in a power cut is acceptable where losing data
    /// is not. One value per batch keeps the log cheap at hundreds of thousands of records/s.
    pub fn log_invocations(&self, newest_ms: i64, records: &[Vec<u8>]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut lines = Vec::with_capacity(records.iter().map(|r| r.len() + 1).sum());
        for r in records {
            lines.extend_from_slice(r);
            lines.push(b'\n');
        }
        let value = zstd::bulk::compress(&lines, 1).map_err(|e| StoreError::Corrupt {
            cf: CF_INVOCATIONS,
            reason: format!("compressing the log: {e}"),
        })?;
        let mut k = ts_key(newest_ms).to_vec();
        k.extend_from_slice(&self.log_counter().to_be_bytes());
        self.db.put_cf(self.cf(CF_INVOCATIONS), k, value)?;
        Ok(())
    }

    fn newest_first(
        &self,
        cf: &'static str,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_range(ts_key(from_ms).to_vec()..ts_key(to_ms).to_vec());
        let mut out = vec![];
        for item in self.db.iterator_cf_opt(self.cf(cf), ro, IteratorMode::End) {
            let (_, v) = item?;
            if keep(&v) {
                out.push(v.to_vec());
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Invocation records of batches whose newest record started at or after `from_ms`,
    /// newest batch first (records within a batch newest first), that `keep` accepts (it
    /// also applies the exact time range).
    pub fn invocations(
        &self,
        from_ms: i64,
        limit: usize,
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let from_ms = from_ms.max(self.visible_from(self.opts.invocation_retention));
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(ts_key(from_ms).to_vec());
        let mut out = vec![];
        for item in self
            .db
            .iterator_cf_opt(self.cf(CF_INVOCATIONS), ro, IteratorMode::End)
        {
            let (_, v) = item?;
            let lines = zstd::stream::decode_all(&v[..]).map_err(|e| StoreError::Corrupt {
                cf: CF_INVOCATIONS,
                reason: format!("log batch: {e}"),
            })?;
            for r in lines.split(|b| *b == b'\n').rev().filter(|r| !r.is_empty()) {
                if keep(r) {
                    out.push(r.to_vec());
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Alerts raised in `[from_ms, to_ms)`, newest first.
    pub fn alerts(
        &self,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let from_ms = from_ms.max(self.visible_from(self.opts.alert_retention));
        self.newest_first(CF_ALERTS, from_ms, to_ms, limit, |_| true)
    }

    /// Deletes invocation records and alerts older than their retention.
    pub(crate) fn function_retention(&self, batch: &mut WriteBatch, now_ms: i64) {
        for (cf, keep) in [
            (CF_INVOCATIONS, self.opts.invocation_retention),
            (CF_ALERTS, self.opts.alert_retention),
        ] {
            if !keep.is_zero() {
                let cut = now_ms - keep.as_millis() as i64;
                batch.delete_range_cf(self.cf(cf), ts_key(i64::MIN), ts_key(cut));
            }
        }
    }

    /// The next free log counter (from the newest invocation or alert key).
    pub(crate) fn load_log_counter(&self) -> Result<u64, StoreError> {
        let mut next = 0;
        for cf in [CF_INVOCATIONS, CF_ALERTS] {
            if let Some(item) = self.db.iterator_cf(self.cf(cf), IteratorMode::End).next() {
                let (k, _) = item?;
                if k.len() == 16 {
                    next = next.max(u64::from_be_bytes(k[8..].try_into().expect("8")) + 1);
                }
            }
        }
        Ok(next)
    }
}
