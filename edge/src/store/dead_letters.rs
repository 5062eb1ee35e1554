//! Dead letters: what ingest refused, with the reason, keyed by the time it arrived.

use std::sync::atomic::Ordering;

use rocksdb::{IteratorMode, ReadOptions, WriteBatch};
use serde::{Deserialize, Serialize};

use super::{CF_DEAD, Store, StoreError, ts_key};

/// A payload the ingest pipeline refused, kept with the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// When the edge received it, Unix ms.
    pub received_ms: i64,
    /// The topic it was published to.
    pub topic: String,
    /// Short reason code (`bad_json`, `bad_field`, `bad_topic`, `unknown_kind`, `too_large`, `unsupported_version`).
    pub reason: String,
    /// The full error message.
    pub error: String,
    /// The payload as text (lossy UTF-8), cut to 4 KiB.
    pub payload: String,
    /// The payload's full size in bytes.
    pub payload_bytes: usize,
}

impl DeadLetter {
    /// Builds a dead letter from a refused message.
    pub fn new(received_ms: i64, topic: &str, payload: &[u8], reason: &str, error: String) -> Self {
        const KEEP: usize = 4096;
        let cut = &payload[..payload.len().min(KEEP)];
        Self {
            received_ms,
            topic: topic.chars().take(512).collect(),
            reason: reason.to_owned(),
            error,
            payload: String::from_utf8_lossy(cut).into_owned(),
            payload_bytes: payload.len(),
        }
    }
}

impl Store {
    /// Adds `d` to `batch`.
    pub(super) fn put_dead_letter(&self, batch: &mut WriteBatch, d: &DeadLetter) {
        let n = self.dead_counter.fetch_add(1, Ordering::Relaxed);
        let mut k = ts_key(d.received_ms).to_vec();
        k.extend_from_slice(&n.to_be_bytes());
        batch.put_cf(
            self.cf(CF_DEAD),
            k,
            serde_json::to_vec(d).expect("dead letters serialize"),
        );
    }

    /// Dead letters received at or after `from_ms`, oldest first, at most `limit`.
    pub fn dead_letters(&self, from_ms: i64, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let from_ms = from_ms.max(self.visible_from(self.opts.dead_letter_retention));
        let mut ro = ReadOptions::default();
        ro.set_iterate_range(ts_key(from_ms).to_vec()..);
        let mut out = vec![];
        for item in self
            .db
            .iterator_cf_opt(self.cf(CF_DEAD), ro, IteratorMode::Start)
            .take(limit)
        {
            let (_, v) = item?;
            out.push(serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                cf: CF_DEAD,
                reason: e.to_string(),
            })?);
        }
        Ok(out)
    }
}
