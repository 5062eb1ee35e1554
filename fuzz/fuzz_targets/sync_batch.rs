//! What the cloud reads from an edge (a sync batch, zstd-compressed, MRS1, MRS2 or MRS3) and what the
//! edge reads back from its own outbox records.
#![no_main]

use libfuzzer_sys::fuzz_target;
use millrace_shared::sync::{self, ItemDecoder, SyncBatch};

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = SyncBatch::decode(data, 1 << 20) {
        let again = SyncBatch::decode(&batch.encode(), 64 << 20).expect("re-decodes");
        assert_eq!(again.items.len(), batch.items.len());
    }
    let _ = sync::decode_item(data);
    let _ = ItemDecoder::default().decode(data);
    let _ = sync::decode_alert_record(data);
});
