//! The dataset layout before Delta Lake: Parquet files named by an append-only `manifest.log`
//! in the data directory. Read once, by the migration ([`super::Dataset::open`]), never
//! written.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;

use millrace_shared::sync::SeqRange;
use serde::Deserialize;

use super::{DataFile, DatasetError, EdgeLedger, io};

/// The manifest's file name in the data directory.
pub(super) const MANIFEST: &str = "manifest.log";

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Record {
    Commit {
        edge: String,
        seqs: Vec<SeqRange>,
        #[serde(default)]
        dropped: Vec<SeqRange>,
        files: Vec<DataFile>,
        received_ms: i64,
        #[serde(default)]
        machines: Vec<String>,
    },
    Compact {
        add: Vec<DataFile>,
        remove: Vec<String>,
    },
    Format {
        version: u32,
    },
}

/// What a manifest says the dataset holds.
#[derive(Debug, Default)]
pub(super) struct Manifest {
    /// Layout version: 1 had no part counts.
    pub(super) format: u32,
    /// Files by path relative to the data directory.
    pub(super) files: BTreeMap<String, DataFile>,
    pub(super) edges: BTreeMap<String, EdgeLedger>,
    pub(super) machines: BTreeSet<String>,
}

impl Manifest {
    fn apply(&mut self, r: Record) {
        match r {
            Record::Commit {
                edge,
                seqs,
                dropped,
                files,
                received_ms,
                machines,
            } => {
                self.machines.extend(machines);
                let ledger = self.edges.entry(edge).or_default();
                for (a, b) in seqs {
                    ledger.received.insert(a, b);
                }
                for (a, b) in dropped {
                    ledger.dropped.insert(a, b);
                }
                ledger.batches += 1;
                ledger.last_commit_ms = Some(received_ms);
                for f in files {
                    self.files.insert(f.path.clone(), f);
                }
            }
            Record::Compact { add, remove } => {
                for p in remove {
                    self.files.remove(&p);
                }
                for f in add {
                    self.files.insert(f.path.clone(), f);
                }
            }
            Record::Format { version } => self.format = version,
        }
    }

    /// Reads `dir/manifest.log`: a torn last line (an interrupted commit, never acknowledged)
    /// is ignored, a damaged line before it is an error.
    pub(super) fn read(dir: &Path) -> Result<Self, DatasetError> {
        let path = dir.join(MANIFEST);
        let file = std::fs::File::open(&path).map_err(io(&path))?;
        let mut m = Self::default();
        let mut lines = BufReader::new(file).lines().enumerate().peekable();
        while let Some((i, line)) = lines.next() {
            let line = line.map_err(io(&path))?;
            match serde_json::from_str::<Record>(&line) {
                Ok(r) => m.apply(r),
                Err(e) if lines.peek().is_none() => {
                    tracing::warn!(line = i + 1, error = %e, "manifest ends with a torn line (an interrupted commit); ignored");
                }
                Err(e) => {
                    return Err(DatasetError::Manifest {
                        line: i + 1,
                        reason: e.to_string(),
                    });
                }
            }
        }
        Ok(m)
    }
}
