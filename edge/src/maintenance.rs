//! Store upkeep, every `store.maintenance_interval`: full windows of raw points sealed into
//! compressed blocks, retention applied, the trigger log trimmed, and the store's size and memory reported as gauges.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError};

/// Runs a maintenance pass every `every` until `stop`. Each pass runs on a blocking thread.
pub(crate) async fn run(store: Arc<Store>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! { _ = tick.tick() => {}, _ = stop.cancelled() => return }
        let store = store.clone();
        match tokio::task::spawn_blocking(move || pass(&store)).await {
            Ok(Ok(sealed)) => {
                if sealed > 0 {
                    tracing::debug!(sealed, "sealed telemetry into blocks");
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "store maintenance failed"),
            Err(e) => tracing::error!(error = %e, "store maintenance panicked"),
        }
    }
}

/// One pass; returns the windows sealed. Blocks.
fn pass(store: &Store) -> Result<u64, StoreError> {
    let now = chrono::Utc::now().timestamp_millis();
    let sealed = store.seal(now)?;
    store.enforce_retention(now)?;
    let trimmed = store.trim_triggers(now)?;
    if trimmed > 0 {
        tracing::debug!(trimmed, "trimmed the trigger log");
    }
    let memory = store.memory()?;
    for (kind, bytes) in [
        ("memtables", memory.memtables),
        ("table_readers", memory.table_readers),
        ("block_cache", memory.block_cache),
    ] {
        metrics::gauge!("millrace_edge_store_memory_bytes", "kind" => kind).set(bytes as f64);
    }
    for (cf, bytes) in &store.size_by_cf()? {
        metrics::gauge!("millrace_edge_store_bytes", "cf" => *cf).set(*bytes as f64);
    }
    Ok(sealed)
}
