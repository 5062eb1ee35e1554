//! Compaction (Delta's optimize): the small files of a partition rewritten into one, the swap
//! committed as one `remove` + `add` (no data change); and vacuum: files no snapshot needs any
//! more deleted once they have been out of the table for a while.

use std::collections::BTreeMap;
use std::path::PathBuf;

use deltalake_core::kernel::Action;
use deltalake_core::protocol::DeltaOperation;
use polars::prelude::*;

use super::delta::{BATCHES, FileView, add_action, merge_tags, unique};
use super::{Dataset, DatasetError, Table, part_counts_schema, read_files, scan_files};
use crate::schema::{events, part_counts, telemetry};

impl Dataset {
    /// Rewrites partitions with at least `min_files` files into one file each (the ledger in
    /// the new file's tag is the union of the old ones'). Returns the files removed.
    pub fn compact(&self, min_files: usize) -> Result<usize, DatasetError> {
        let _rt = self.enter();
        let mut removed = 0;
        for table in Table::ALL {
            removed += self.compact_table(table.as_str(), Some(table), min_files)?;
        }
        removed += self.compact_table(BATCHES, None, min_files)?;
        Ok(removed)
    }

    fn compact_table(
        &self,
        name: &'static str,
        table: Option<Table>,
        min_files: usize,
    ) -> Result<usize, DatasetError> {
        let files = match table {
            Some(t) => self.file_views(t, None, None),
            None => self.batch_file_views(),
        };
        let mut groups: BTreeMap<(String, String), Vec<FileView>> = BTreeMap::new();
        for f in files {
            groups
                .entry((f.file.date.clone(), f.file.site.clone()))
                .or_default()
                .push(f);
        }
        let mut removed = 0;
        for ((date, site), old) in groups {
            if old.len() < min_files.max(2) {
                continue;
            }
            let files: Vec<_> = old.iter().map(|f| f.file.clone()).collect();
            let paths: Vec<PathBuf> = self.read_paths(&files)?;
            let mut df = match table {
                Some(Table::Telemetry | Table::Alerts) => {
                    read_files(&paths)?.sort([telemetry::TS], SortMultipleOptions::default())?
                }
                Some(Table::Events) => read_files(&paths)?.sort(
                    [events::KIND, events::TS],
                    SortMultipleOptions::default().with_maintain_order(true),
                )?,
                // Commits may count the same minute (a batch ends mid-minute): sum them.
                Some(Table::PartCounts) => scan_files(&paths)?
                    .group_by(part_counts::KEY.map(col))
                    .agg(part_counts::COUNTS.map(|c| col(c).sum()))
                    .sort(part_counts::KEY, SortMultipleOptions::default())
                    .collect()?,
                None => {
                    read_files(&paths)?.sort(["received_at"], SortMultipleOptions::default())?
                }
            };
            if table == Some(Table::PartCounts) {
                part_counts_schema(&mut df)?;
            }
            let rel = match table {
                Some(_) => format!("date={date}/site={site}/compacted-{}.parquet", unique()),
                None => format!("date={date}/compacted-{}.parquet", unique()),
            };
            let size = self.storage.put(self.runtime(), name, &rel, &mut df)?;
            let tags: Vec<_> = old.iter().filter_map(|f| f.tag.as_ref()).collect();
            let tag = (!tags.is_empty()).then(|| merge_tags(tags));
            let mut add = add_action(
                rel.clone(),
                &date,
                &site,
                size,
                df.height() as u64,
                tag.as_ref(),
            );
            add.data_change = false;
            if table.is_none() {
                add.partition_values.remove("site");
            }
            let now = chrono::Utc::now().timestamp_millis();
            let mut actions = vec![Action::Add(add)];
            for f in &old {
                actions.push(Action::Remove(deltalake_core::kernel::Remove {
                    path: f.rel.clone(),
                    data_change: false,
                    deletion_timestamp: Some(now),
                    extended_file_metadata: Some(true),
                    partition_values: Some(
                        [
                            ("date".to_owned(), Some(date.clone())),
                            (
                                "site".to_owned(),
                                (site != crate::schema::alerts::NO_SITE).then(|| site.clone()),
                            ),
                        ]
                        .into_iter()
                        .filter(|(k, _)| table.is_some() || k != "site")
                        .collect(),
                    ),
                    size: Some(f.size),
                    ..Default::default()
                }));
            }
            let mut t = self.ensure_table(name, &df.clear())?;
            // The files were listed from this node's view: if another node's compaction removed
            // one since, committing would add their rows a second time (delta-rs does not flag
            // two removes of one file as a conflict). So: read the table's latest commits, check
            // that every file is still there, and commit only on top of that version.
            self.catch_up(name, &mut t)?;
            if !self.holds_files(name, old.iter().map(|f| f.rel.as_str())) {
                drop(t);
                self.storage.delete(self.runtime(), name, &rel);
                tracing::info!(
                    table = name,
                    "compaction of a partition skipped: its files changed meanwhile"
                );
                continue;
            }
            let committed = self.commit_actions_with(
                name,
                &mut t,
                actions,
                None,
                DeltaOperation::Optimize {
                    predicate: None,
                    target_size: 0,
                },
                0,
            );
            match committed {
                Ok(_) => removed += old.len(),
                Err(e) => {
                    // Nothing names it: it must not fill the disk that perhaps just ran out.
                    self.storage.delete(self.runtime(), name, &rel);
                    if matches!(
                        e,
                        DatasetError::Conflict(_)
                            | DatasetError::Delta { .. }
                            | DatasetError::Storage { .. }
                    ) {
                        // Another node compacted these files first.
                        tracing::warn!(table = name, error = %e, "compaction of a partition skipped");
                        continue;
                    }
                    return Err(e);
                }
            }
        }
        Ok(removed)
    }

    /// Deletes files that no snapshot of the last `after` needs: those a compaction replaced
    /// and those of commits that never completed, once they are older than `after`. Returns
    /// how many.
    pub fn remove_retired(&self, after: std::time::Duration) -> usize {
        let mut deleted = 0;
        for name in super::delta::NAMES {
            match self.vacuum(name, after) {
                Ok(n) => deleted += n,
                Err(e) => {
                    tracing::warn!(table = name, error = %e, "vacuum failed; tried again later")
                }
            }
        }
        // On a bucket: cached copies of files no snapshot names any more.
        let live = self.live_files();
        let pruned = self.storage.prune_cache(&live);
        if pruned > 0 {
            tracing::debug!(files = pruned, "cached copies of retired files removed");
        }
        deleted
    }
}
