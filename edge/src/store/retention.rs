//! Retention: data older than each kind's retention deleted by key range per series and
//! machine, and hidden from queries at once.

use std::time::Duration;

use rocksdb::WriteBatch;

use super::series::IndexName;
use super::{CF_BLOCKS, CF_DEAD, CF_EVENTS, CF_HEAD, Store, StoreError, series_ts_key, ts_key};

impl Store {
    /// Deletes data older than each kind's retention. Cheap to call often: it acts when a
    /// cutoff has moved past a new block window or series were added. Data older than the
    /// cutoff that arrives late is hidden from queries at once and deleted by the next pass
    /// that acts (at the latest one block window later).
    pub fn enforce_retention(&self, now_ms: i64) -> Result<(), StoreError> {
        let window = self.window_ms();
        let cut = |d: Duration| {
            (!d.is_zero()).then(|| (now_ms - d.as_millis() as i64).div_euclid(window) * window)
        };
        let ids_now = self.index.read().expect("index lock").next_id;
        let mut done = self.retention_done.lock().expect("retention lock");
        // Act when the cutoff moved or series were added since the last pass.
        let mut fresh = |kind: &'static str, cutoff: Option<i64>| match cutoff {
            Some(c) if done.get(kind) != Some(&(c, ids_now)) => {
                done.insert(kind, (c, ids_now));
                Some(c)
            }
            _ => None,
        };
        let (telemetry, events, dead) = (
            fresh("telemetry", cut(self.opts.telemetry_retention)),
            fresh("events", cut(self.opts.event_retention)),
            fresh("dead", cut(self.opts.dead_letter_retention)),
        );
        // The function log and alerts: once per block window.
        let function_log = fresh("functions", cut(Duration::from_millis(1)));
        drop(done);
        let _guard = self.write_lock.lock().expect("write lock");
        let mut batch = WriteBatch::default();
        let ids: Vec<(u32, bool)> = self
            .index
            .read()
            .expect("index lock")
            .by_id
            .iter()
            .map(|(id, name)| {
                (
                    *id,
                    matches!(IndexName::parse(name), Some(IndexName::Series(_))),
                )
            })
            .collect();
        for (id, is_series) in ids {
            let lo = series_ts_key(id, i64::MIN);
            match (is_series, telemetry, events) {
                (true, Some(c), _) => {
                    batch.delete_range_cf(self.cf(CF_HEAD), lo, series_ts_key(id, c));
                    // Blocks start at window boundaries: a block starting before the cutoff is whole.
                    batch.delete_range_cf(self.cf(CF_BLOCKS), lo, series_ts_key(id, c));
                }
                (false, _, Some(c)) => {
                    batch.delete_range_cf(self.cf(CF_EVENTS), lo, series_ts_key(id, c));
                }
                _ => {}
            }
        }
        if let Some(c) = dead {
            batch.delete_range_cf(self.cf(CF_DEAD), ts_key(i64::MIN), ts_key(c));
        }
        if function_log.is_some() {
            self.function_retention(&mut batch, now_ms);
        }
        if let Some(c) = telemetry {
            let mut unsealed = self.unsealed.lock().expect("unsealed lock");
            for ws in unsealed.windows.values_mut() {
                ws.retain(|w| *w >= c);
            }
            unsealed.windows.retain(|_, ws| !ws.is_empty());
        }
        if !batch.is_empty() {
            self.db.write(batch)?;
        }
        Ok(())
    }

    pub(super) fn visible_from(&self, retention: Duration) -> i64 {
        if retention.is_zero() {
            i64::MIN
        } else {
            chrono::Utc::now().timestamp_millis() - retention.as_millis() as i64
        }
    }
}
