//! Compaction: small files of a partition rewritten into one, recorded as one manifest line;
//! the files it replaced removed once no query can still be reading them. Also the one-time
//! upgrade of a dataset written before the part-counts rollup existed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use polars::prelude::*;

use super::{
    DataFile, Dataset, DatasetError, FORMAT, Record, Table, count_parts, part_counts_schema,
    read_files, scan_files,
};
use crate::schema::{events, part_counts, telemetry};

impl Dataset {
    /// Brings a dataset of an older layout to [`FORMAT`]: builds the part counts of every
    /// partition from its event files (once; progress is logged per partition).
    pub(super) fn upgrade(&self) -> Result<(), DatasetError> {
        let (format, partitions) = {
            let s = self.state.lock().expect("state lock");
            let mut g: BTreeMap<(String, String), Vec<PathBuf>> = BTreeMap::new();
            for f in s.files.values().filter(|f| f.table == Table::Events) {
                g.entry((f.date.clone(), f.site.clone()))
                    .or_default()
                    .push(self.dir.join(&f.path));
            }
            (s.format, g)
        };
        if format >= FORMAT {
            return Ok(());
        }
        let mut manifest = self.manifest.lock().expect("manifest lock");
        if !partitions.is_empty() {
            tracing::info!(
                partitions = partitions.len(),
                "dataset of layout {format}: building the part counts from the event files"
            );
        }
        let n = partitions.len();
        for (i, ((date, site), paths)) in partitions.into_iter().enumerate() {
            let mut df = count_parts(scan_files(&paths)?, true).collect()?;
            let df = part_counts_schema(&mut df)?;
            let id = self.next_id();
            let rel = format!(
                "{}/date={date}/site={site}/{id:012}-upgrade.parquet",
                Table::PartCounts.as_str()
            );
            let rows = df.height() as u64;
            self.write_file(&rel, df)?;
            let written = self.dir.join(&rel);
            let record = Record::Compact {
                id,
                add: vec![DataFile {
                    path: rel,
                    table: Table::PartCounts,
                    date,
                    site,
                    rows,
                }],
                remove: vec![],
            };
            if let Err(e) = self.append(&mut manifest, &record) {
                let _ = std::fs::remove_file(&written);
                return Err(e);
            }
            Self::apply(&mut self.state.lock().expect("state lock"), record);
            tracing::info!(partition = i + 1, of = n, "part counts built");
        }
        let record = Record::Format { version: FORMAT };
        self.append(&mut manifest, &record)?;
        Self::apply(&mut self.state.lock().expect("state lock"), record);
        Ok(())
    }

    /// Rewrites partitions with more than `min_files` files into one file each. Returns the
    /// files removed.
    pub fn compact(&self, min_files: usize) -> Result<usize, DatasetError> {
        let groups: Vec<((Table, String, String), Vec<DataFile>)> = {
            let state = self.state.lock().expect("state lock");
            let mut g: BTreeMap<(Table, String, String), Vec<DataFile>> = BTreeMap::new();
            for f in state.files.values() {
                g.entry((f.table, f.date.clone(), f.site.clone()))
                    .or_default()
                    .push(f.clone());
            }
            g.into_iter()
                .filter(|(_, v)| v.len() >= min_files.max(2))
                .collect()
        };
        let mut removed = 0;
        for ((table, date, site), old) in groups {
            let paths: Vec<PathBuf> = old.iter().map(|f| self.dir.join(&f.path)).collect();
            let mut df = match table {
                Table::Telemetry | Table::Alerts => {
                    read_files(&paths)?.sort([telemetry::TS], SortMultipleOptions::default())?
                }
                Table::Events => read_files(&paths)?.sort(
                    [events::KIND, events::TS],
                    SortMultipleOptions::default().with_maintain_order(true),
                )?,
                // Commits may count the same minute (a batch ends mid-minute): sum them.
                Table::PartCounts => scan_files(&paths)?
                    .group_by(part_counts::KEY.map(col))
                    .agg(part_counts::COUNTS.map(|c| col(c).sum()))
                    .sort(part_counts::KEY, SortMultipleOptions::default())
                    .collect()?,
            };
            if table == Table::PartCounts {
                part_counts_schema(&mut df)?;
            }
            let mut manifest = self.manifest.lock().expect("manifest lock");
            let id = self.next_id();
            let rel = format!(
                "{}/date={date}/site={site}/{id:012}-compacted.parquet",
                table.as_str()
            );
            let rows = df.height() as u64;
            self.write_file(&rel, &mut df)?;
            let written = self.dir.join(&rel);
            let record = Record::Compact {
                id,
                add: vec![DataFile {
                    path: rel,
                    table,
                    date,
                    site,
                    rows,
                }],
                remove: old.iter().map(|f| f.path.clone()).collect(),
            };
            if let Err(e) = self.append(&mut manifest, &record) {
                // No line names it: it must not fill the disk that just ran out.
                let _ = std::fs::remove_file(&written);
                return Err(e);
            }
            Self::apply(&mut self.state.lock().expect("state lock"), record);
            drop(manifest);
            let now = std::time::Instant::now();
            self.retired
                .lock()
                .expect("retired lock")
                .extend(paths.into_iter().map(|p| (now, p)));
            removed += old.len();
        }
        Ok(removed)
    }

    /// Deletes files that compactions replaced at least `after` ago. Returns how many.
    pub fn remove_retired(&self, after: std::time::Duration) -> usize {
        let due: Vec<PathBuf> = {
            let mut r = self.retired.lock().expect("retired lock");
            let (due, keep) = r.drain(..).partition(|(t, _)| t.elapsed() >= after);
            *r = keep;
            due.into_iter().map(|(_, p)| p).collect()
        };
        for p in &due {
            if let Err(e) = std::fs::remove_file(p) {
                tracing::warn!(path = %p.display(), error = %e, "could not remove a compacted file; it will be removed at the next start");
            }
        }
        due.len()
    }
}
