//! What the cloud holds of each edge: the outbox sequence numbers received and the ones the
//! edge reported dropped, and from them the gaps.

use millrace_shared::sync::{RangeSet, SeqRange};
use serde::Serialize;

/// What the cloud holds of one edge.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EdgeLedger {
    /// Outbox sequence numbers held.
    pub received: RangeSet,
    /// Sequence numbers the edge reported dropped under its quota.
    pub dropped: RangeSet,
    /// Batches committed.
    pub batches: u64,
    /// Unix ms of the last commit.
    pub last_commit_ms: Option<i64>,
}

impl EdgeLedger {
    /// Items held.
    pub fn items(&self) -> u64 {
        self.received.len()
    }

    /// Items the edge dropped under its quota (reported ranges minus what arrived anyway: the
    /// edge reports a lane's dropped seqs as ranges that may span the other lane's items).
    pub fn dropped_items(&self) -> u64 {
        self.dropped.len() - self.dropped.intersection_len(&self.received)
    }

    /// Holes in the received sequence that the edge did not report as dropped.
    pub fn gaps(&self) -> Vec<SeqRange> {
        let mut out = vec![];
        for (a, b) in self.received.gaps() {
            // Subtract dropped ranges from [a, b].
            let mut lo = a;
            for &(da, db) in self.dropped.ranges() {
                if db < lo || da > b {
                    continue;
                }
                if da > lo {
                    out.push((lo, da - 1));
                }
                lo = db.saturating_add(1);
                if lo > b {
                    break;
                }
            }
            if lo <= b {
                out.push((lo, b));
            }
        }
        out
    }
}
