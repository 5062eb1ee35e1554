//! The cloud's integration tests: the dataset on real files, the API through `Router::oneshot`
//! and over real HTTP on 127.0.0.1:0.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use millrace_cloud::api::{ApiState, app};
use millrace_cloud::config::{CloudConfig, EdgeAuth, token_digest};
use millrace_cloud::dataset::{Dataset, Table};
use millrace_shared::sync::{AlertItem, CONTENT_TYPE, SYNC_PATH, SyncBatch, SyncItem};
use millrace_shared::{
    Alert, Event, EventBody, FunctionReport, MachineId, MachineState, PartOutcome, PartProduced,
    Reading, StateChange, StopReason, Telemetry,
};
use serde_json::Value;
use tower::ServiceExt;

const TOKEN: &str = "mrt_test-token-of-edge-one-0123456789";
const READ_KEY: &str = "read-key-0123456789";

fn machine(i: u32) -> MachineId {
    MachineId::new(format!("site-{}", i % 2), "line-a", format!("m{i}")).unwrap()
}

/// `n` items from seq `first`: mostly telemetry, some parts and state changes.
fn items(first: u64, n: u64) -> Vec<SyncItem> {
    (first..first + n)
        .map(|seq| {
            let body = match seq % 10 {
                0 => EventBody::Part(PartProduced {
                    outcome: PartOutcome::Good,
                    cycle_time_ms: 30_000,
                    part_id: None,
                }),
                5 => EventBody::State(StateChange {
                    state: MachineState::Running,
                    reason: None,
                }),
                _ => EventBody::Telemetry(Telemetry {
                    readings: vec![
                        Reading {
                            name: "temperature".into(),
                            value: 60.0 + (seq % 7) as f64 / 4.0,
                            unit: "C".into(),
                        },
                        Reading {
                            name: "power".into(),
                            value: 3.25,
                            unit: "kW".into(),
                        },
                    ],
                }),
            };
            SyncItem {
                seq,
                stored_ms: 1_767_600_000_000 + seq as i64,
                backfill: false,
                event: Event {
                    machine: machine((seq % 4) as u32),
                    // Spans two days, so batches touch several partitions.
                    ts_ms: 1_767_600_000_000 + seq as i64 * 60_000,
                    seq,
                    body,
                },
            }
        })
        .collect()
}

/// Stores `batches` batches of 100 items from edge `e1` (seq 1, 2, …).
fn store_hundreds(ds: &Dataset, batches: u64) {
    for i in 0..batches {
        millrace_cloud::sync::store(ds, "e1", &items(1 + i * 100, 100), &[], &[], i as i64)
            .unwrap();
    }
}

fn rows(ds: &Dataset, table: Table) -> u64 {
    ds.sizes().get(&table).map_or(0, |s| s.1)
}

#[test]
fn a_batch_sent_twice_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let ds = Dataset::open(dir.path(), true).unwrap();
    let batch = items(1, 3000);
    let ack = millrace_cloud::sync::store(&ds, "e1", &batch, &[], &[], 1).unwrap();
    assert_eq!((ack.stored, ack.duplicates), (3000, 0));
    let telemetry = rows(&ds, Table::Telemetry);
    assert_eq!(telemetry, 2 * 2400);
    // The same batch again (a lost acknowledgement), and one overlapping it (rebuilt
    // differently after an edge restart): only the new items are stored.
    let again = millrace_cloud::sync::store(&ds, "e1", &batch, &[], &[], 2).unwrap();
    assert_eq!((again.stored, again.duplicates), (0, 3000));
    let overlap = millrace_cloud::sync::store(&ds, "e1", &items(2001, 2000), &[], &[], 3).unwrap();
    assert_eq!((overlap.stored, overlap.duplicates), (1000, 1000));
    assert_eq!(rows(&ds, Table::Telemetry), 2 * 3200);
    assert_eq!(rows(&ds, Table::Events), 800);
    // Another edge's seqs are its own.
    assert_eq!(
        millrace_cloud::sync::store(&ds, "e2", &items(1, 10), &[], &[], 4)
            .unwrap()
            .stored,
        10
    );
    let edges = ds.edges();
    assert_eq!(edges["e1"].received.ranges(), &[(1, 4000)]);
    assert_eq!(edges["e1"].items(), 4000);
    assert!(edges["e1"].gaps().is_empty());
    // Reopened: the same ledger and rows.
    drop(ds);
    let ds = Dataset::open(dir.path(), true).unwrap();
    assert_eq!(ds.edges()["e1"].received.ranges(), &[(1, 4000)]);
    assert_eq!(
        rows(&ds, Table::Telemetry),
        2 * 3200 + 2 * 8,
        "e1's and e2's"
    );
    assert_eq!(
        millrace_cloud::sync::store(&ds, "e1", &batch, &[], &[], 5)
            .unwrap()
            .stored,
        0
    );
}

/// The Delta log entries of every table (a commit adds one).
fn log_entries(dir: &std::path::Path) -> usize {
    [
        "telemetry",
        "events",
        "part_counts",
        "alerts",
        "sync_batches",
    ]
    .iter()
    .filter_map(|t| std::fs::read_dir(dir.join(t).join("_delta_log")).ok())
    .flatten()
    .filter(|e| {
        e.as_ref()
            .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".json"))
    })
    .count()
}

#[test]
fn an_interrupted_commit_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let ds = Dataset::open(dir.path(), true).unwrap();
    millrace_cloud::sync::store(&ds, "e1", &items(1, 100), &[], &[], 1).unwrap();
    millrace_cloud::sync::store(&ds, "e1", &items(101, 50), &[], &[], 2).unwrap();
    let (telemetry, events) = (rows(&ds, Table::Telemetry), rows(&ds, Table::Events));
    drop(ds);
    // A crash after the batch's data was committed but before its `sync_batches` row was:
    // the data tables hold seqs 101..150, the ledger does not.
    let entries = log_files(dir.path(), "sync_batches", ".json");
    std::fs::remove_file(entries.last().unwrap()).unwrap();
    // And a crash after a file was written but before any commit named it.
    let orphan = dir
        .path()
        .join("telemetry/date=2026-01-05/site=site-0/0000000000099-e1-orphan.parquet");
    std::fs::write(&orphan, b"partial parquet").unwrap();

    let ds = Dataset::open(dir.path(), true).unwrap();
    assert_eq!(ds.edges()["e1"].received.ranges(), &[(1, 100)]);
    assert_eq!(
        rows(&ds, Table::Telemetry),
        telemetry,
        "the orphan is not read"
    );
    // The edge sends the unacknowledged batch again: its rows are not stored twice, and the
    // batch is complete.
    let again = millrace_cloud::sync::store(&ds, "e1", &items(101, 60), &[], &[], 3).unwrap();
    assert_eq!((again.stored, again.duplicates), (10, 50));
    assert_eq!(ds.edges()["e1"].received.ranges(), &[(1, 160)]);
    // Seqs 151..160: 8 telemetry items of 2 readings, a part and a state change.
    assert_eq!(rows(&ds, Table::Telemetry), telemetry + 16);
    assert_eq!(rows(&ds, Table::Events), events + 2);
    // Files no commit names go once they are old enough.
    assert!(orphan.exists());
    assert_eq!(ds.remove_retired(std::time::Duration::from_secs(3600)), 0);
    ds.remove_retired(std::time::Duration::ZERO);
    assert!(!orphan.exists());
    assert_eq!(rows(&ds, Table::Telemetry), telemetry + 16);
    drop(ds);
    let ds = Dataset::open(dir.path(), true).unwrap();
    assert_eq!(ds.edges()["e1"].received.ranges(), &[(1, 160)]);
    let df = millrace_cloud::dataset::read_files(&ds.files(Table::Telemetry, None, None).unwrap())
        .unwrap();
    assert_eq!(df.height() as u64, telemetry + 16);
}

/// A damaged checkpoint (the file that opening reads instead of every commit before it) stops
/// the cloud at start with an error that names the table and says how to recover; the commits
/// are all still in the log, so without the damaged file the table opens with every row.
#[test]
fn a_corrupt_checkpoint_is_an_error_at_start_that_names_the_table_and_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let ds = Dataset::open(dir.path(), false).unwrap();
    // Every batch has events: one commit each to `events`; delta-rs checkpoints every 100.
    for i in 0..100 {
        millrace_cloud::sync::store(&ds, "e1", &items(1 + i * 10, 10), &[], &[], i as i64).unwrap();
    }
    let events = rows(&ds, Table::Events);
    drop(ds);
    // Opened from the checkpoint: the files' tags (the ledger) are in it.
    let ds = Dataset::open(dir.path(), false).unwrap();
    assert_eq!(ds.edges()["e1"].received.ranges(), &[(1, 1000)]);
    assert_eq!(ds.edges()["e1"].batches, 100);
    drop(ds);
    let log = dir.path().join("events/_delta_log");
    let checkpoint = std::fs::read_dir(&log)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".checkpoint.parquet"))
        .expect("a checkpoint after 100 commits");
    std::fs::write(&checkpoint, b"PAR1 not really a checkpoint PAR1").unwrap();
    let err = Dataset::open(dir.path(), false).unwrap_err().to_string();
    assert!(err.contains("events"), "{err}");
    assert!(err.contains("checkpoint"), "{err}");
    assert!(err.contains("_last_checkpoint"), "names the way out: {err}");
    // The way out the message gives.
    std::fs::remove_file(&checkpoint).unwrap();
    std::fs::remove_file(log.join("_last_checkpoint")).unwrap();
    let ds = Dataset::open(dir.path(), false).unwrap();
    assert_eq!(rows(&ds, Table::Events), events);
    assert_eq!(ds.edges()["e1"].received.ranges(), &[(1, 1000)]);
}

/// The files of table `table`'s Delta log whose names end with `suffix`, in version order.
fn log_files(dir: &std::path::Path, table: &str, suffix: &str) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join(table).join("_delta_log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    files
}

/// The retention of a table's log entries (`delta.logRetentionDuration`) in its newest metadata.
fn log_retention(dir: &std::path::Path, table: &str) -> Option<String> {
    let entries = log_files(dir, table, ".json");
    entries.iter().rev().find_map(|p| {
        std::fs::read_to_string(p).unwrap().lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let c = v.get("metaData")?.get("configuration")?;
            Some(
                c["delta.logRetentionDuration"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            )
        })
    })
}

/// Tables on the local disk keep an hour of log entries (delta-rs lists the log directory at
/// every commit); a table created without that setting gets it when the cloud opens it.
#[test]
fn local_tables_keep_their_log_short_also_tables_created_before() {
    let dir = tempfile::tempdir().unwrap();
    let ds = Dataset::open(dir.path(), false).unwrap();
    millrace_cloud::sync::store(&ds, "e1", &items(1, 20), &[], &[], 1).unwrap();
    drop(ds);
    assert_eq!(
        log_retention(dir.path(), "events").as_deref(),
        Some("interval 1 hours")
    );
    // As a table of the version before: the setting taken out of its creation.
    let first = dir
        .path()
        .join("events/_delta_log/00000000000000000000.json");
    let text: Vec<String> = std::fs::read_to_string(&first)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if let Some(c) = v.pointer_mut("/metaData/configuration") {
                c.as_object_mut()
                    .unwrap()
                    .remove("delta.logRetentionDuration");
            }
            v.to_string()
        })
        .collect();
    std::fs::write(&first, text.join("\n") + "\n").unwrap();
    assert_eq!(log_retention(dir.path(), "events").as_deref(), Some(""));
    let ds = Dataset::open(dir.path(), false).unwrap();
    assert_eq!(
        log_retention(dir.path(), "events").as_deref(),
        Some("interval 1 hours")
    );
    assert_eq!(rows(&ds, Table::Events), 4);
    assert_eq!(ds.edges()["e1"].received.ranges(), &[(1, 20)]);
}

#[test]
fn a_damaged_table_log_is_an_error_that_names_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let ds = Dataset::open(dir.path(), true).unwrap();
    millrace_cloud::sync::store(&ds, "e1", &items(1, 10), &[], &[], 1).unwrap();
    millrace_cloud::sync::store(&ds, "e1", &items(11, 10), &[], &[], 2).unwrap();
    drop(ds);
    let entry = dir
        .path()
        .join("events/_delta_log/00000000000000000001.json");
    let text = std::fs::read_to_string(&entry).unwrap();
    std::fs::write(&entry, text.replacen("{", "{{", 1)).unwrap();
    let err = Dataset::open(dir.path(), true).unwrap_err().to_string();
    assert!(err.contains("events"), "{err}");
}

/// The view a node keeps up to date commit by commit (from each commit's own actions) is the
/// view a node that opens the dataset afterwards builds from the tables' snapshots: the same
/// ledger, machines and files, across batches out of order, a duplicate, a dropped range, two
/// edges and a compaction between commits.
#[test]
fn the_view_kept_commit_by_commit_equals_the_view_built_on_opening() {
    let dir = tempfile::tempdir().unwrap();
    let ds = Dataset::open(dir.path(), false).unwrap();
    let store = |edge: &str, first: u64, n: u64, dropped: &[(u64, u64)], at: i64| {
        millrace_cloud::sync::store(&ds, edge, &items(first, n), &[], dropped, at).unwrap()
    };
    store("e1", 1, 100, &[], 1);
    store("e1", 201, 100, &[], 2);
    store("e2", 1, 40, &[], 3);
    store("e1", 101, 100, &[], 4);
    let again = store("e1", 251, 100, &[], 5);
    assert_eq!((again.stored, again.duplicates), (50, 50));
    store("e2", 61, 40, &[(41, 60)], 6);
    assert!(ds.compact(2).unwrap() > 0);
    store("e1", 351, 100, &[], 7);
    store("e2", 101, 10, &[], 8);
    let seen = |ds: &Dataset| {
        let files: Vec<_> = Table::ALL
            .into_iter()
            .map(|t| {
                let mut f = ds.files(t, None, None).unwrap();
                f.sort();
                f
            })
            .collect();
        (
            format!("{:?}", ds.edges()),
            ds.machines(),
            files,
            ds.sizes(),
        )
    };
    let kept = seen(&ds);
    assert_eq!(ds.edges()["e1"].received.ranges(), &[(1, 450)]);
    assert_eq!(ds.edges()["e2"].dropped.ranges(), &[(41, 60)]);
    let opened = Dataset::open(dir.path(), false).unwrap();
    assert_eq!(kept, seen(&opened));
}

/// Two nodes compact the same partitions, one of them from a view it read before the other's
/// compaction: the rows are in the table once.
#[test]
fn two_nodes_compacting_the_same_files_keep_every_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let a = Dataset::open(dir.path(), false).unwrap();
    store_hundreds(&a, 6);
    let b = Dataset::open(dir.path(), false).unwrap();
    let (telemetry, events) = (rows(&a, Table::Telemetry), rows(&a, Table::Events));
    assert!(a.compact(2).unwrap() > 0);
    // b still sees the files a just replaced.
    b.compact(2).unwrap();
    for ds in [&a, &b] {
        ds.refresh(std::time::Duration::ZERO).unwrap();
        let df = millrace_cloud::dataset::read_files(&ds.files(Table::Events, None, None).unwrap())
            .unwrap();
        assert_eq!(df.height() as u64, events);
        assert_eq!(
            df.column("outbox_seq").unwrap().n_unique().unwrap(),
            df.height()
        );
        assert_eq!(rows(ds, Table::Telemetry), telemetry);
        assert_eq!(ds.edges()["e1"].received.ranges(), &[(1, 600)]);
    }
}

/// Two nodes start on one empty dataset at the same moment, each fed by an edge of its own,
/// while both also read each other's commits and compact: every batch of both edges is in the
/// ledger and every row in the tables once, on both nodes and on a third opened afterwards.
/// (The tables are created by whichever node comes first; any interleaving must give this.)
#[test]
fn two_nodes_starting_together_storing_refreshing_and_compacting_lose_no_batch() {
    let (batches, per) = (24u64, 20u64);
    for round in 0..4 {
        let dir = tempfile::tempdir().unwrap();
        let a = Dataset::open(dir.path(), false).unwrap();
        let b = Dataset::open(dir.path(), false).unwrap();
        let done = std::sync::atomic::AtomicUsize::new(0);
        let barrier = std::sync::Barrier::new(4);
        std::thread::scope(|s| {
            for (ds, edge) in [(&a, "e1"), (&b, "e2")] {
                let (barrier, done) = (&barrier, &done);
                s.spawn(move || {
                    barrier.wait();
                    for i in 0..batches {
                        let ack = millrace_cloud::sync::store(
                            ds,
                            edge,
                            &items(1 + i * per, per),
                            &[],
                            &[],
                            1_767_600_000_000 + i as i64,
                        )
                        .unwrap();
                        assert_eq!((ack.stored, ack.duplicates), (per, 0), "{edge} batch {i}");
                        if i % 6 == 5 {
                            ds.compact(2).unwrap();
                        }
                    }
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
                s.spawn(move || {
                    barrier.wait();
                    while done.load(std::sync::atomic::Ordering::SeqCst) < 2 {
                        ds.refresh(std::time::Duration::ZERO).unwrap();
                    }
                });
            }
        });
        let c = Dataset::open(dir.path(), false).unwrap();
        let want_events = (1..=batches * per)
            .filter(|s| s % 10 == 0 || s % 10 == 5)
            .count()
            * 2;
        for (name, ds) in [("a", &a), ("b", &b), ("c", &c)] {
            ds.refresh(std::time::Duration::ZERO).unwrap();
            for edge in ["e1", "e2"] {
                assert_eq!(
                    ds.edges()[edge].received.ranges(),
                    &[(1, batches * per)],
                    "round {round}: node {name}'s ledger of {edge}"
                );
            }
            let df =
                millrace_cloud::dataset::read_files(&ds.files(Table::Events, None, None).unwrap())
                    .unwrap();
            assert_eq!(
                df.height(),
                want_events,
                "round {round}: node {name}'s events"
            );
            let edges = df.column("edge").unwrap().as_materialized_series().clone();
            let seqs = df
                .column("outbox_seq")
                .unwrap()
                .as_materialized_series()
                .clone();
            let keys: std::collections::HashSet<String> = (0..df.height())
                .map(|i| format!("{}/{}", edges.get(i).unwrap(), seqs.get(i).unwrap()))
                .collect();
            assert_eq!(
                keys.len(),
                want_events,
                "round {round}: node {name}: a row twice"
            );
        }
    }
}

/// A table on the local disk keeps an hour of log: once a checkpoint covers them, entries
/// older than that are deleted by the next commit (delta-rs lists the whole log at every
/// commit), and the table still opens with everything it held.
#[test]
fn log_entries_older_than_an_hour_go_once_a_checkpoint_covers_them() {
    let dir = tempfile::tempdir().unwrap();
    let ds = Dataset::open(dir.path(), false).unwrap();
    let store = |i: u64| {
        millrace_cloud::sync::store(&ds, "e1", &items(1 + i * 10, 10), &[], &[], i as i64).unwrap();
    };
    // Version 0 creates each table, then one commit per batch: a checkpoint at version 99.
    for i in 0..100 {
        store(i);
    }
    let (telemetry, events) = (rows(&ds, Table::Telemetry), rows(&ds, Table::Events));
    let entries = |suffix: &str| log_files(dir.path(), "sync_batches", suffix);
    assert_eq!(entries(".json").len(), 101);
    assert_eq!(entries(".checkpoint.parquet").len(), 1);
    store(100);
    assert_eq!(
        entries(".json").len(),
        102,
        "nothing older than an hour yet"
    );
    // Two hours pass for every entry so far.
    let then = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 3600);
    for table in ["telemetry", "events", "part_counts", "sync_batches"] {
        for e in std::fs::read_dir(dir.path().join(table).join("_delta_log")).unwrap() {
            let path = e.unwrap().path();
            if path.is_file() {
                let f = std::fs::File::options().write(true).open(&path).unwrap();
                f.set_modified(then).unwrap();
            }
        }
    }
    store(101);
    // Versions 0..=98 went; the checkpoint (99) and what follows it stay.
    let left: Vec<String> = entries(".json")
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        [
            "00000000000000000099.json",
            "00000000000000000100.json",
            "00000000000000000101.json",
            "00000000000000000102.json"
        ]
    );
    drop(ds);
    let ds = Dataset::open(dir.path(), false).unwrap();
    assert_eq!(ds.edges()["e1"].received.ranges(), &[(1, 1020)]);
    assert_eq!(ds.edges()["e1"].batches, 102);
    assert_eq!(rows(&ds, Table::Telemetry), telemetry + 2 * 16);
    assert_eq!(rows(&ds, Table::Events), events + 2 * 2);
}

#[test]
fn compaction_keeps_every_row_and_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let ds = Dataset::open(dir.path(), true).unwrap();
    store_hundreds(&ds, 6);
    let (before_t, before_e) = (rows(&ds, Table::Telemetry), rows(&ds, Table::Events));
    let listed = ds.files(Table::Telemetry, None, None).unwrap();
    let removed = ds.compact(3).unwrap();
    assert!(removed > 0);
    assert!(ds.files(Table::Telemetry, None, None).unwrap().len() < listed.len());
    // A query that listed the files before the compaction can still read them.
    let df = millrace_cloud::dataset::read_files(&listed).unwrap();
    assert_eq!(df.height() as u64, before_t);
    // Replaced files go once they have been retired long enough (here: at once).
    assert_eq!(ds.remove_retired(std::time::Duration::from_secs(3600)), 0);
    assert_eq!(ds.remove_retired(std::time::Duration::ZERO), removed);
    assert!(listed.iter().all(|p| !p.exists()));
    assert_eq!(rows(&ds, Table::Telemetry), before_t);
    assert_eq!(rows(&ds, Table::Events), before_e);
    let df = millrace_cloud::dataset::read_files(&ds.files(Table::Telemetry, None, None).unwrap())
        .unwrap();
    assert_eq!(df.height() as u64, before_t);
    drop(ds);
    let ds = Dataset::open(dir.path(), true).unwrap();
    assert_eq!(rows(&ds, Table::Telemetry), before_t);
    assert_eq!(ds.edges()["e1"].received.ranges(), &[(1, 600)]);
}

/// Parts of 3 machines every 7 s with all three outcomes (30,000 parts: 2.4 days).
fn part_items(first: u64, n: u64) -> Vec<SyncItem> {
    (first..first + n)
        .map(|seq| SyncItem {
            seq,
            stored_ms: 0,
            backfill: false,
            event: Event {
                machine: machine((seq % 3) as u32),
                ts_ms: 1_767_657_000_000 + seq as i64 * 7_000,
                seq,
                body: EventBody::Part(PartProduced {
                    outcome: match seq % 11 {
                        0 => PartOutcome::Scrap,
                        5 => PartOutcome::Rework,
                        _ => PartOutcome::Good,
                    },
                    cycle_time_ms: 7_000,
                    part_id: None,
                }),
            },
        })
        .collect()
}

/// Parts per machine and minute, sorted, as (machine, minute, good, scrap, rework) rows.
fn minutes(ds: &Dataset, from_ms: i64, to_ms: i64, rollup: bool) -> Vec<(String, i64, [i64; 3])> {
    let sel = millrace_cloud::query::Selection {
        from_ms,
        to_ms,
        entity: None,
        sites: None,
    };
    let Some(lf) = millrace_cloud::reports::part_minutes(ds, &sel, rollup).unwrap() else {
        return vec![];
    };
    use polars::prelude::*;
    // Without the rollup, `minute` is each part's own time.
    let df = lf
        .with_column(((col("minute") / lit(60_000i64)) * lit(60_000i64)).alias("minute"))
        .group_by([col("site"), col("line"), col("machine"), col("minute")])
        .agg([col("good").sum(), col("scrap").sum(), col("rework").sum()])
        .sort(["machine", "minute"], SortMultipleOptions::default())
        .collect()
        .unwrap();
    let s = |c: &str| df.column(c).unwrap().as_materialized_series().clone();
    let (m, t, g, sc, r) = (
        s("machine"),
        s("minute"),
        s("good"),
        s("scrap"),
        s("rework"),
    );
    (0..df.height())
        .map(|i| {
            let n = |x: &Series| x.get(i).unwrap().try_extract::<i64>().unwrap();
            (m.get(i).unwrap().to_string(), n(&t), [n(&g), n(&sc), n(&r)])
        })
        .collect()
}

#[test]
fn part_counts_per_minute_equal_the_raw_events_across_batches_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let ds = Dataset::open(dir.path(), true).unwrap();
    // Batches that end mid-minute, so several commits count the same minute.
    let all = part_items(1, 30_000);
    for chunk in all.chunks(4_321) {
        millrace_cloud::sync::store(&ds, "e1", chunk, &[], &[], 1).unwrap();
    }
    // A batch sent again counts nothing twice.
    millrace_cloud::sync::store(&ds, "e1", &all[..5_000], &[], &[], 2).unwrap();
    assert!(rows(&ds, Table::PartCounts) > 0);
    let t0 = 1_767_657_000_000i64;
    let ranges = [
        (t0, t0 + 2 * 86_400_000),                            // everything
        (t0 + 61_234, t0 + 3_600_000 + 59_999),               // partial minutes at both ends
        (t0 + 86_400_000 - 30_000, t0 + 86_400_000 + 30_000), // across midnight, less than a minute each side
        (t0 + 10_001, t0 + 50_000),                           // within one minute
    ];
    let check = |ds: &Dataset| {
        for (a, b) in ranges {
            let raw = minutes(ds, a, b, false);
            assert!(!raw.is_empty());
            assert!(minutes(ds, a, b, true) == raw, "range {a}..{b}");
        }
        let total: i64 = minutes(ds, t0, t0 + 3 * 86_400_000, true)
            .iter()
            .map(|r| r.2.iter().sum::<i64>())
            .sum();
        assert_eq!(total, 30_000);
    };
    check(&ds);
    let removed = ds.compact(2).unwrap();
    assert!(removed > 0);
    assert_eq!(
        ds.files(Table::PartCounts, None, None).unwrap().len(),
        8,
        "one file per date (4) and site (2)"
    );
    check(&ds);
    // Compacted event files are sorted by kind, then time (scans for state changes skip the
    // row groups of parts).
    for f in ds.files(Table::Events, None, None).unwrap() {
        let df = millrace_cloud::dataset::read_files(&[f]).unwrap();
        let kinds: Vec<String> = df
            .column("kind")
            .unwrap()
            .as_materialized_series()
            .iter()
            .map(|v| v.to_string())
            .collect();
        assert!(kinds.windows(2).all(|w| w[0] <= w[1]));
    }
    drop(ds);
    let ds = Dataset::open(dir.path(), true).unwrap();
    check(&ds);
}

/// A copy of the dataset written by the layout before Delta (a `manifest.log`, kept in the
/// repository as written by that version's code): e1 sent seqs 1..1500, 1501..2100 (parts, with
/// 2101..2200 reported dropped), 2201..3000; e2 1..300; then compaction and its removal of
/// retired files; then e1 3001..3200.
fn old_dataset() -> tempfile::TempDir {
    fn copy(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &to.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/manifest-dataset"),
        dir.path(),
    );
    dir
}

#[test]
fn a_dataset_of_the_manifest_layout_is_converted_once_with_nothing_lost() {
    let dir = old_dataset();
    let ds = Dataset::open(dir.path(), true).unwrap();
    assert!(!dir.path().join("manifest.log").exists());
    assert!(dir.path().join("manifest.log.migrated").exists());
    let edges = ds.edges();
    assert_eq!(edges["e1"].received.ranges(), &[(1, 2100), (2201, 3200)]);
    assert_eq!(edges["e1"].dropped.ranges(), &[(2101, 2200)]);
    assert!(edges["e1"].gaps().is_empty());
    assert_eq!(edges["e1"].batches, 4);
    assert_eq!(edges["e2"].received.ranges(), &[(1, 300)]);
    // Telemetry items (seq % 10 not 0 or 5) have 2 readings; the rest are events, and
    // 1501..2100 are parts.
    let tele = |a: u64, b: u64| (a..=b).filter(|s| s % 10 != 0 && s % 10 != 5).count() as u64;
    let ev = |a: u64, b: u64| (b - a + 1) - tele(a, b);
    let want_t = 2 * (tele(1, 1500) + tele(2201, 3200) + tele(1, 300));
    let want_e = ev(1, 1500) + 600 + ev(2201, 3200) + ev(1, 300);
    assert_eq!(rows(&ds, Table::Telemetry), want_t);
    assert_eq!(rows(&ds, Table::Events), want_e);
    // What the files hold, read through the new tables' snapshots.
    let df = millrace_cloud::dataset::read_files(&ds.files(Table::Telemetry, None, None).unwrap())
        .unwrap();
    assert_eq!(df.height() as u64, want_t);
    let t0 = 1_767_600_000_000i64;
    let raw = minutes(&ds, t0, t0 + 4 * 86_400_000, false);
    assert_eq!(
        raw.iter().map(|r| r.2.iter().sum::<i64>()).sum::<i64>() as u64,
        (1..=1500)
            .chain(2201..=3200)
            .chain(1..=300)
            .filter(|s| s % 10 == 0)
            .count() as u64
            + 600
    );
    assert!(
        minutes(&ds, t0, t0 + 4 * 86_400_000, true) == raw,
        "part counts kept"
    );
    // The ledger works on: a batch sent again is a duplicate, a new one is stored.
    let again = millrace_cloud::sync::store(&ds, "e1", &items(3101, 100), &[], &[], 9).unwrap();
    assert_eq!((again.stored, again.duplicates), (0, 100));
    let next = millrace_cloud::sync::store(&ds, "e1", &items(3201, 100), &[], &[], 9).unwrap();
    assert_eq!(next.stored, 100);
    let files = ds.files(Table::Telemetry, None, None).unwrap().len();
    drop(ds);
    // Once: opened again, nothing is converted twice.
    let ds = Dataset::open(dir.path(), true).unwrap();
    assert_eq!(ds.files(Table::Telemetry, None, None).unwrap().len(), files);
    assert_eq!(
        ds.edges()["e1"].received.ranges(),
        &[(1, 2100), (2201, 3300)]
    );
    assert_eq!(ds.edges()["e1"].batches, 5);
    assert_eq!(rows(&ds, Table::Telemetry), want_t + 2 * tele(3201, 3300));
}

#[test]
fn a_dataset_of_the_first_layout_gets_its_part_counts_when_converted() {
    let dir = old_dataset();
    let t0 = 1_767_600_000_000i64;
    // Layout 1: no part counts, no layout record.
    let manifest = dir.path().join("manifest.log");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let old: Vec<String> = text
        .lines()
        .filter(|l| {
            l.contains("\"commit\"") || !(l.contains("\"format\"") || l.contains("part_counts"))
        })
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            if let Some(files) = v["files"].as_array_mut() {
                files.retain(|f| f["table"] != "part_counts");
            }
            v.to_string()
        })
        .collect();
    std::fs::write(&manifest, old.join("\n") + "\n").unwrap();
    std::fs::remove_dir_all(dir.path().join("part_counts")).unwrap();

    let ds = Dataset::open(dir.path(), true).unwrap();
    assert!(rows(&ds, Table::PartCounts) > 0);
    let raw = minutes(&ds, t0, t0 + 4 * 86_400_000, false);
    assert!(!raw.is_empty());
    assert!(minutes(&ds, t0, t0 + 4 * 86_400_000, true) == raw);
    let files = ds.files(Table::PartCounts, None, None).unwrap().len();
    drop(ds);
    let ds = Dataset::open(dir.path(), true).unwrap();
    assert_eq!(
        ds.files(Table::PartCounts, None, None).unwrap().len(),
        files
    );
}

#[test]
fn a_damaged_manifest_line_in_the_middle_stops_the_conversion_with_nothing_changed() {
    let dir = old_dataset();
    let manifest = dir.path().join("manifest.log");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replacen("commit", "c0mmit", 1)).unwrap();
    let err = Dataset::open(dir.path(), true).unwrap_err().to_string();
    // Line 1 is the layout version; line 2 the first commit.
    assert!(err.contains("manifest line 2"), "{err}");
    assert!(manifest.exists());
    assert!(!dir.path().join("telemetry/_delta_log").exists());
}

#[test]
fn dropped_ranges_are_not_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let ds = Dataset::open(dir.path(), true).unwrap();
    millrace_cloud::sync::store(&ds, "e1", &items(1, 10), &[], &[], 1).unwrap();
    millrace_cloud::sync::store(&ds, "e1", &items(31, 10), &[], &[(11, 20)], 2).unwrap();
    let l = &ds.edges()["e1"];
    assert_eq!(l.gaps(), vec![(21, 30)]);
    assert_eq!(l.dropped.len(), 10);
}

fn state(dir: &std::path::Path, keys: bool) -> ApiState {
    let mut cfg = CloudConfig {
        data_dir: dir.to_owned(),
        ..Default::default()
    };
    cfg.edges.insert(
        "e1".into(),
        EdgeAuth {
            token_sha256: token_digest(TOKEN),
        },
    );
    if keys {
        cfg.http.read_keys = vec![READ_KEY.into()];
    }
    ApiState {
        dataset: Arc::new(Dataset::open(dir, true).unwrap()),
        cfg: Arc::new(cfg),
        metrics: millrace_cloud::metrics_handle(),
        started: Instant::now(),
        commits: Arc::new(tokio::sync::watch::channel(0).0),
        master: Default::default(),
        edge_reports: Default::default(),
        live_slots: Arc::new(tokio::sync::Semaphore::new(2)),
    }
}

async fn call(s: &ApiState, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app(s.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&body)
        .unwrap_or(Value::String(String::from_utf8_lossy(&body).into()));
    (status, v)
}

fn post(token: Option<&str>, body: Vec<u8>) -> Request<Body> {
    let mut r = Request::post(SYNC_PATH).header("content-type", CONTENT_TYPE);
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    r.body(Body::from(body)).unwrap()
}

fn get(uri: &str, key: Option<&str>) -> Request<Body> {
    let mut r = Request::get(uri);
    if let Some(k) = key {
        r = r.header("authorization", format!("Bearer {k}"));
    }
    r.body(Body::empty()).unwrap()
}

fn batch(edge: &str, first: u64, n: u64) -> Vec<u8> {
    SyncBatch {
        edge: edge.into(),
        items: items(first, n),
        ..SyncBatch::default()
    }
    .encode()
}

#[tokio::test]
async fn sync_refuses_missing_and_wrong_tokens_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path(), true);
    let (st, v) = call(&s, post(None, batch("e1", 1, 10))).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    assert!(v["error"].as_str().unwrap().contains("token"), "{v}");
    let (st, _) = call(
        &s,
        post(Some("mrt_wrong-token-0123456789abcdef"), batch("e1", 1, 10)),
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // A good token claiming another edge's identity.
    let (st, v) = call(&s, post(Some(TOKEN), batch("e2", 1, 10))).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    assert!(s.dataset.edges().is_empty());
    assert!(s.dataset.sizes().is_empty());
    assert_eq!(log_entries(dir.path()), 0, "no commit");
    // The right token is accepted.
    let (st, v) = call(&s, post(Some(TOKEN), batch("e1", 1, 10))).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["stored"], 10);
}

#[tokio::test]
async fn bad_batches_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path(), false);
    let (st, v) = call(&s, post(Some(TOKEN), b"{\"not\":\"a batch\"}".to_vec())).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("not a Millrace sync batch"),
        "{v}"
    );
    let mut cut = batch("e1", 1, 100);
    cut.truncate(cut.len() / 2);
    let (st, v) = call(&s, post(Some(TOKEN), cut)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let wrong_type = Request::post(SYNC_PATH)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::from(batch("e1", 1, 1)))
        .unwrap();
    let (st, v) = call(&s, wrong_type).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(s.dataset.edges().is_empty());
}

#[tokio::test]
async fn data_queries_check_keys_and_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path(), true);
    call(&s, post(Some(TOKEN), batch("e1", 1, 400))).await;
    let range = "from=2026-01-01T00:00:00Z&to=2026-02-01T00:00:00Z";
    let (st, _) = call(&s, get(&format!("/api/v1/telemetry?{range}"), None)).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _) = call(
        &s,
        get(
            &format!("/api/v1/telemetry?{range}"),
            Some("not-the-key-0123456789"),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, v) = call(
        &s,
        get(
            &format!("/api/v1/telemetry?{range}&machine=site-1/line-a/m1&metric=power"),
            Some(READ_KEY),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let pts = v["points"].as_array().unwrap();
    assert_eq!(pts.len(), 80, "seqs ≡ 1 mod 4 that are telemetry");
    assert!(
        pts.iter()
            .all(|p| p["value"] == 3.25 && p["machine"] == "m1")
    );
    for (q, needle) in [
        ("from=yesterday", "`from`"),
        (
            "from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z",
            "before",
        ),
        ("machine=a/b", "site/line/machine"),
        ("machine=bad%20id", "not a valid id"),
        ("machine=a/b%20c/d", "`line` = `b c` is not a valid id"),
        ("machine=a/b/c/d", "site/line/machine"),
        ("kind=telemetry", "`kind`"),
        ("format=xml", "format"),
        ("limit=0", "`limit`"),
        ("colour=red", "colour"),
        ("from=2020-01-01T00:00:00Z&to=2026-01-01T00:00:00Z", "days"),
    ] {
        let (st, v) = call(&s, get(&format!("/api/v1/events?{q}"), Some(READ_KEY))).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{q}: {v}");
        let msg = v["error"].as_str().unwrap_or_default().to_owned() + &v.to_string();
        assert!(msg.contains(needle), "{q}: {msg}");
    }
    let (st, v) = call(
        &s,
        get(
            &format!("/api/v1/events?{range}&kind=part&format=csv"),
            Some(READ_KEY),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let csv = v.as_str().unwrap();
    assert!(csv.starts_with("site,line,machine,ts"), "{csv}");
    assert_eq!(csv.lines().count(), 1 + 40);
    let (st, v) = call(&s, get("/api/v1/edges", Some(READ_KEY))).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["edges"][0]["items"], 400);
    assert!(v["edges"][0].get("outbox").is_none(), "no report yet: {v}");
    // A heartbeat (no data) with the edge's outbox: stored nothing, shown per edge.
    let edge = v["edges"][0]["edge"].as_str().unwrap().to_owned();
    let now = chrono::Utc::now().timestamp_millis();
    let heartbeat = SyncBatch {
        edge: edge.clone(),
        outbox: Some(millrace_shared::OutboxReport {
            waiting_items: 1234,
            oldest_waiting_ms: Some(now - 90_000),
        }),
        ..SyncBatch::default()
    }
    .encode();
    let (st, ack) = call(&s, post(Some(TOKEN), heartbeat)).await;
    assert_eq!(st, StatusCode::OK, "{ack}");
    assert_eq!(ack["stored"], 0);
    let (_, v) = call(&s, get("/api/v1/edges", Some(READ_KEY))).await;
    let e = &v["edges"][0];
    assert_eq!(e["items"], 400);
    assert_eq!(e["outbox"]["waiting_items"], 1234, "{v}");
    let lag = e["sync_lag_ms"].as_i64().unwrap();
    assert!((90_000..200_000).contains(&lag), "{v}");
    assert!(e["last_seen_ms"].as_i64().unwrap() >= now);
    assert_eq!(e["online"], true, "{v}");
    // Filters a report cannot use are refused, naming them.
    for (path, q, needle) in [
        ("oee", "kind=part", "`kind`"),
        ("production", "metric=power", "`metric`"),
        ("downtime", "metric=power", "`metric`"),
        ("telemetry", "kind=state", "`kind`"),
    ] {
        let (st, v) = call(
            &s,
            get(
                &format!("/api/v1/reports/{path}?{range}&{q}"),
                Some(READ_KEY),
            ),
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{path}?{q}: {v}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{v}");
    }
    let (st, tv) = call(
        &s,
        get(
            &format!("/api/v1/reports/telemetry?{range}&metric=power"),
            Some(READ_KEY),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{tv}");
    // Unknown machines are 404; the OpenAPI document names every route the router serves.
    let (st, nf) = call(
        &s,
        get(
            &format!("/api/v1/reports/oee?{range}&machine=nope"),
            Some(READ_KEY),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{nf}");
    assert!(nf["error"].as_str().unwrap().contains("nope"), "{nf}");
    let (st, doc) = call(&s, get("/api/v1/openapi.json", None)).await;
    assert_eq!(st, StatusCode::OK);
    for path in [
        "/api/v1/reports/oee",
        "/api/v1/reports/production",
        "/api/v1/reports/downtime",
        "/api/v1/reports/telemetry",
        "/api/v1/sync/batches",
        "/api/v1/edges",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
        let (st, _) = call(&s, get(&format!("{path}?{range}"), Some(READ_KEY))).await;
        assert_ne!(st, StatusCode::NOT_FOUND, "{path} served");
    }
    assert_eq!(v["edges"][0]["gap_items"], 0);
}

#[tokio::test]
async fn the_openapi_document_names_every_route_and_every_documented_route_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path(), false);
    let (st, doc) = call(&s, get("/api/v1/openapi.json", None)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        doc,
        serde_json::from_str::<Value>(millrace_cloud::api::openapi_document()).unwrap()
    );
    let mut documented = vec![];
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            documented.push(format!("{} {path}", method.to_uppercase()));
            assert!(
                op["responses"]["200"].is_object(),
                "{method} {path} documents its answer"
            );
            // Served: the router answers this method on this path with something else than
            // "no such route" (404 with an empty body) or "wrong method" (405).
            let req = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(path.as_str())
                .body(Body::empty())
                .unwrap();
            let resp = app(s.clone()).oneshot(req).await.unwrap();
            assert_ne!(
                resp.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            if resp.status() == StatusCode::NOT_FOUND {
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                assert!(!body.is_empty(), "{method} {path} is served");
            }
        }
    }
    documented.sort();
    let mut expected: Vec<String> = [
        "GET /",
        "GET /api/v1/alerts",
        "GET /api/v1/edges",
        "GET /api/v1/events",
        "GET /api/v1/live",
        "GET /api/v1/machines",
        "GET /api/v1/master",
        "GET /api/v1/openapi.json",
        "GET /api/v1/reports/downtime",
        "GET /api/v1/reports/oee",
        "GET /api/v1/reports/production",
        "GET /api/v1/reports/states",
        "GET /api/v1/reports/telemetry",
        "GET /api/v1/telemetry",
        "GET /assets/echarts.min.js",
        "GET /health",
        "GET /metrics",
        "POST /api/v1/sync/batches",
        "PUT /api/v1/master/machines",
    ]
    .map(String::from)
    .to_vec();
    expected.sort();
    assert_eq!(documented, expected);
    // The report filters are documented as the server reads them.
    let oee = &doc["paths"]["/api/v1/reports/oee"]["get"];
    let params: Vec<&str> = oee["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for p in [
        "from", "to", "site", "line", "machine", "level", "period", "format",
    ] {
        assert!(params.contains(&p), "{p} in {params:?}");
    }
}

#[tokio::test]
async fn a_real_server_takes_a_batch_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = CloudConfig {
        data_dir: dir.path().to_owned(),
        ..Default::default()
    };
    cfg.http.listen = "127.0.0.1:0".parse().unwrap();
    cfg.edges.insert(
        "e1".into(),
        EdgeAuth {
            token_sha256: token_digest(TOKEN),
        },
    );
    let cloud = millrace_cloud::Cloud::start(cfg).await.unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://{}{SYNC_PATH}", cloud.addr);
    let r = http
        .post(&url)
        .bearer_auth(TOKEN)
        .header("content-type", CONTENT_TYPE)
        .body(batch("e1", 1, 1000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ack: Value = r.json().await.unwrap();
    assert_eq!(ack["stored"], 1000);
    let r = http
        .post(&url)
        .body(batch("e1", 1, 10))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let metrics = http
        .get(format!("http://{}/metrics", cloud.addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("millrace_cloud_sync_items_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("millrace_cloud_sync_refused_total"),
        "{metrics}"
    );
    cloud.shutdown().await;
}

/// An alert of function `function` about machine `m` (none: a scheduled run), raised at `ts_ms`.
fn alert(seq: u64, function: &str, severity: &str, m: Option<u32>, ts_ms: i64) -> AlertItem {
    let device = m.map(|i| machine(i).to_string()).unwrap_or_default();
    AlertItem {
        seq,
        stored_ms: ts_ms,
        backfill: false,
        alert: Alert {
            id: format!("{function}:{seq}:0"),
            ts_ms,
            trigger: if m.is_some() { "topic" } else { "schedule" }.into(),
            function: function.into(),
            version: 1,
            severity: severity.into(),
            message: format!("alert {seq}"),
            topic: m
                .map(|_| format!("factory/{device}/telemetry"))
                .unwrap_or_default(),
            device,
            event_ts_ms: ts_ms - 5,
        },
    }
}

#[tokio::test]
async fn alerts_are_stored_once_and_queried_by_machine_function_severity_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path(), true);
    let t0 = chrono::Utc::now().timestamp_millis() - 3_600_000;
    let alerts: Vec<AlertItem> = (0..40u64)
        .map(|i| {
            let (f, sev) = if i % 4 == 0 {
                ("hourly", "info")
            } else {
                ("hot", ["warning", "critical"][(i % 2) as usize])
            };
            let m = (f == "hot").then_some((i % 4) as u32);
            // Outbox seqs interleave with the events' (one counter per edge).
            alert(1000 + 2 * i, f, sev, m, t0 + i as i64 * 60_000)
        })
        .collect();
    let body = SyncBatch {
        edge: "e1".into(),
        items: items(1, 20),
        alerts: alerts.clone(),
        ..SyncBatch::default()
    }
    .encode();
    let (st, v) = call(&s, post(Some(TOKEN), body.clone())).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        (v["stored"].as_u64(), v["duplicates"].as_u64()),
        (Some(60), Some(0))
    );
    // Sent again (a lost answer): nothing new.
    let (st, v) = call(&s, post(Some(TOKEN), body)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        (v["stored"].as_u64(), v["duplicates"].as_u64()),
        (Some(0), Some(60))
    );
    assert_eq!(rows(&s.dataset, Table::Alerts), 40);

    let query = |q: &str| {
        let s = s.clone();
        let q = q.to_owned();
        async move { call(&s, get(&format!("/api/v1/alerts?{q}"), Some(READ_KEY))).await }
    };
    let (st, v) = query("").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let all = v["alerts"].as_array().unwrap();
    assert_eq!(all.len(), 40);
    // Newest first, each once.
    let ts: Vec<i64> = all.iter().map(|a| a["ts"].as_i64().unwrap()).collect();
    assert!(ts.windows(2).all(|w| w[0] >= w[1]), "{ts:?}");
    let ids: std::collections::BTreeSet<&str> =
        all.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 40);
    let newest = &all[0];
    assert_eq!(newest["id"], "hot:1078:0");
    assert_eq!(newest["severity"], "critical");
    assert_eq!(newest["machine"], "m3");
    assert_eq!(newest["site"], "site-1");
    assert_eq!(newest["topic"], "factory/site-1/line-a/m3/telemetry");
    assert_eq!(newest["edge"], "e1");
    assert_eq!(newest["outbox_seq"], 1078);
    assert_eq!(newest["event_ts"].as_i64(), Some(t0 + 39 * 60_000 - 5));
    // Scheduled runs' alerts have no machine.
    let hourly = all.iter().find(|a| a["function"] == "hourly").unwrap();
    assert!(
        hourly["machine"].is_null() && hourly["site"].is_null(),
        "{hourly}"
    );

    let count = |v: &Value| v["alerts"].as_array().map_or(0, Vec::len);
    for (q, want) in [
        ("function=hot", 30),
        ("function=hourly", 10),
        ("function=nobody", 0),
        ("severity=critical", 20),
        ("function=hot&severity=warning", 10),
        ("machine=site-1/line-a/m1", 10),
        ("site=site-1", 20),
        ("site=site-0&line=line-a&machine=m2", 10),
        ("limit=7", 7),
    ] {
        let (st, v) = query(q).await;
        assert_eq!(st, StatusCode::OK, "{q}: {v}");
        assert_eq!(count(&v), want, "{q}");
    }
    let from = t0 + 10 * 60_000;
    let (_, v) = query(&format!("from={from}&to={}", from + 5 * 60_000)).await;
    assert_eq!(count(&v), 5);
    let (st, v) = query("format=csv&function=hourly").await;
    assert_eq!(st, StatusCode::OK);
    let csv = v.as_str().unwrap();
    assert!(
        csv.starts_with("site,line,machine,ts,id,function,"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 11);

    // Bad parameters: a clear 400 each.
    for (q, needle) in [
        ("severity=fatal", "`severity`"),
        ("function=no%20spaces", "`function`"),
        ("kind=part", "`kind` does not apply to alerts"),
        ("metric=power", "`metric` does not apply to alerts"),
        (
            "from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z",
            "before",
        ),
        ("limit=0", "`limit`"),
        ("bogus=1", "bogus"),
    ] {
        let (st, v) = query(q).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{q}: {v}");
    }
    let (st, v) = call(&s, get("/api/v1/events?function=hot", Some(READ_KEY))).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("does not apply to events")
    );
    // Nor do alert filters apply to a report (they were read as a column the report lacks).
    for q in [
        "reports/oee?severity=critical",
        "reports/telemetry?function=hot",
        "reports/oee?resolution=5m",
    ] {
        let (st, v) = call(&s, get(&format!("/api/v1/{q}"), Some(READ_KEY))).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{q}: {v}");
        let e = v["error"].as_str().unwrap();
        assert!(e.contains("does not apply to this report"), "{q}: {v}");
    }
    let (st, _) = call(&s, get("/api/v1/alerts", None)).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn function_figures_from_edges_show_in_edges_and_metrics_without_a_commit() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path(), true);
    call(&s, post(Some(TOKEN), batch("e1", 1, 10))).await;
    let before = log_entries(dir.path());
    // A batch with only the figures (an idle edge).
    let report = FunctionReport {
        name: "hot".into(),
        version: 2,
        invocations: 1234,
        failures: 3,
        skipped: 0,
        lag_events: 17,
        lag_ms: 2500,
    };
    let body = SyncBatch {
        edge: "e1".into(),
        functions: vec![report.clone()],
        ..SyncBatch::default()
    }
    .encode();
    let (st, v) = call(&s, post(Some(TOKEN), body)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["stored"], 0);
    assert_eq!(log_entries(dir.path()), before, "nothing to commit");
    let (st, v) = call(&s, get("/api/v1/edges", Some(READ_KEY))).await;
    assert_eq!(st, StatusCode::OK);
    let f = &v["edges"][0]["functions"][0];
    assert_eq!(
        serde_json::from_value::<FunctionReport>(f.clone()).unwrap(),
        report,
        "{v}"
    );
    let text = s.metrics.render();
    for line in [
        "millrace_cloud_edge_function_invocations{edge=\"e1\",function=\"hot\"} 1234",
        "millrace_cloud_edge_function_failures{edge=\"e1\",function=\"hot\"} 3",
        "millrace_cloud_edge_function_lag_events{edge=\"e1\",function=\"hot\"} 17",
        "millrace_cloud_edge_function_lag_seconds{edge=\"e1\",function=\"hot\"} 2.5",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
}

#[tokio::test]
async fn the_state_timeline_merges_repeats_cuts_to_the_range_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path(), true);
    const MIN: i64 = 60_000;
    // 2026-01-05T08:00:00Z; the range is the hour after it.
    let t0 = 1_767_600_000_000_i64;
    let m0 = MachineId::new("site-0", "line-a", "m0").unwrap();
    let m1 = MachineId::new("site-0", "line-a", "m1").unwrap();
    let changes = [
        // Before the range: decides the state at its start.
        (&m0, -120, MachineState::Running, None),
        (
            &m0,
            10,
            MachineState::Down,
            Some(StopReason::TechnicalFailure),
        ),
        (&m0, 25, MachineState::Running, None),
        // A repeat: merged into the interval before it.
        (&m0, 30, MachineState::Running, None),
        (&m0, 50, MachineState::PlannedStop, Some(StopReason::Break)),
        // After the range: cuts nothing into it.
        (&m0, 70, MachineState::Running, None),
        // m1's first known state is inside the range: the time before it is not covered.
        (&m1, 40, MachineState::Idle, Some(StopReason::NoOrder)),
    ];
    let items: Vec<SyncItem> = changes
        .iter()
        .enumerate()
        .map(|(i, (m, min, state, reason))| {
            let seq = i as u64 + 1;
            SyncItem {
                seq,
                stored_ms: t0 + min * MIN,
                backfill: false,
                event: Event {
                    machine: (*m).clone(),
                    ts_ms: t0 + min * MIN,
                    seq,
                    body: EventBody::State(StateChange {
                        state: *state,
                        reason: *reason,
                    }),
                },
            }
        })
        .collect();
    let body = SyncBatch {
        edge: "e1".into(),
        items,
        ..SyncBatch::default()
    }
    .encode();
    let (st, v) = call(&s, post(Some(TOKEN), body)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let range = "from=2026-01-05T08:00:00Z&to=2026-01-05T09:00:00Z";
    let (st, v) = call(
        &s,
        get(&format!("/api/v1/reports/states?{range}"), Some(READ_KEY)),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let got: Vec<(String, String, Option<String>, i64, i64)> = v["intervals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["machine"].as_str().unwrap().to_owned(),
                i["state"].as_str().unwrap().to_owned(),
                i["reason"].as_str().map(str::to_owned),
                (i["start_ms"].as_i64().unwrap() - t0) / MIN,
                (i["end_ms"].as_i64().unwrap() - t0) / MIN,
            )
        })
        .collect();
    let want = |m: &str, st: &str, r: Option<&str>, a: i64, b: i64| {
        (m.to_owned(), st.to_owned(), r.map(str::to_owned), a, b)
    };
    assert_eq!(
        got,
        vec![
            want("site-0/line-a/m0", "running", None, 0, 10),
            want(
                "site-0/line-a/m0",
                "down",
                Some("technical_failure"),
                10,
                25
            ),
            want("site-0/line-a/m0", "running", None, 25, 50),
            want("site-0/line-a/m0", "planned_stop", Some("break"), 50, 60),
            want("site-0/line-a/m1", "idle", Some("no_order"), 40, 60),
        ]
    );
    // One machine, as CSV.
    let (st, v) = call(
        &s,
        get(
            &format!("/api/v1/reports/states?{range}&machine=site-0/line-a/m1&format=csv"),
            Some(READ_KEY),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        v.as_str().unwrap(),
        format!(
            "machine,state,reason,start_ms,end_ms\nsite-0/line-a/m1,idle,no_order,{},{}\n",
            t0 + 40 * MIN,
            t0 + 60 * MIN
        )
    );
    // At a resolution of 16 minutes (what one pixel stands for): the 10-minute run and the
    // 15-minute stop after it become one interval of the state they spent most time in, with
    // what it holds; the 25- and 20-minute intervals are kept, and so is the last short one (no
    // neighbour to merge with).
    let (st, v) = call(
        &s,
        get(
            &format!("/api/v1/reports/states?{range}&resolution=16m"),
            Some(READ_KEY),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let got: Vec<(String, i64, i64, Option<u64>)> = v["intervals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["state"].as_str().unwrap().to_owned(),
                (i["start_ms"].as_i64().unwrap() - t0) / MIN,
                (i["end_ms"].as_i64().unwrap() - t0) / MIN,
                i["merged"].as_u64(),
            )
        })
        .collect();
    let merged = |st: &str, a: i64, b: i64, n: Option<u64>| (st.to_owned(), a, b, n);
    assert_eq!(
        got,
        vec![
            merged("down", 0, 25, Some(2)),
            merged("running", 25, 50, None),
            merged("planned_stop", 50, 60, None),
            merged("idle", 40, 60, None),
        ]
    );
    assert_eq!(v["intervals"][0]["reason"], serde_json::Value::Null);
    assert_eq!(
        v["intervals"][0]["state_ms"],
        serde_json::json!({"down": 15 * MIN, "running": 10 * MIN})
    );
    let (st, v) = call(
        &s,
        get(
            &format!("/api/v1/reports/states?{range}&resolution=960000&format=csv&machine=site-0/line-a/m0"),
            Some(READ_KEY),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        v.as_str().unwrap().lines().take(2).collect::<Vec<_>>(),
        [
            "machine,state,reason,start_ms,end_ms,merged".to_owned(),
            format!("site-0/line-a/m0,down,,{},{},2", t0, t0 + 25 * MIN)
        ]
    );
    // Bad input: a 400 that names what is wrong; nothing answered by a guess.
    for (q, needle) in [
        ("resolution=0", "`resolution` = `0`"),
        ("resolution=2h", "between 1 ms and the range"),
        ("resolution=fine", "expected milliseconds or a duration"),
        ("limit=4", "more than `limit` = 4"),
        ("level=line", "`level`"),
        ("period=shift", "`period`"),
        ("window=1h", "`window`"),
        ("metric=power", "`metric`"),
        ("kind=state", "`kind`"),
        ("limit=0", "`limit`"),
        ("format=xml", "format"),
        ("to=soon", "`to`"),
    ] {
        let (st, v) = call(
            &s,
            get(
                &format!("/api/v1/reports/states?{range}&{q}"),
                Some(READ_KEY),
            ),
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{q}: {v}");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{q}: {msg}");
    }
    let (st, _) = call(&s, get(&format!("/api/v1/reports/states?{range}"), None)).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);

    // Gzipped for a client that accepts it (browsers do): the same JSON; the live stream is not
    // compressed (it would be held back in the compressor).
    let (_, plain) = call(
        &s,
        get(&format!("/api/v1/reports/states?{range}"), Some(READ_KEY)),
    )
    .await;
    let mut req = get(&format!("/api/v1/reports/states?{range}"), Some(READ_KEY));
    req.headers_mut()
        .insert("accept-encoding", "gzip, deflate, br".parse().unwrap());
    let resp = app(s.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&body[..]), &mut text).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), plain);
    let mut req = get("/api/v1/live", Some(READ_KEY));
    req.headers_mut()
        .insert("accept-encoding", "gzip".parse().unwrap());
    let resp = app(s.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("content-encoding").is_none());
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
}

/// Two nodes (two datasets on one directory, as two processes on one shared store) are sent the
/// same edge's batches at the same moment, as an edge whose answer was lost retries on the other
/// node: each item is stored by exactly one of them, the other counts it a duplicate, and the
/// tables hold every item once.
#[test]
fn the_same_batch_on_two_nodes_at_once_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let a = Dataset::open(dir.path(), false).unwrap();
    let b = Dataset::open(dir.path(), false).unwrap();
    let rounds = 12u64;
    let per = 50u64;
    for round in 0..rounds {
        let batch = items(1 + round * per, per);
        let barrier = std::sync::Barrier::new(2);
        let (batch, barrier, na, nb) = (&batch, &barrier, &a, &b);
        let node = move |ds: &Dataset| {
            barrier.wait();
            millrace_cloud::sync::store(ds, "e1", batch, &[], &[], 1_767_600_000_000).unwrap()
        };
        let (ra, rb) = std::thread::scope(|s| {
            let ha = s.spawn(move || node(na));
            let hb = s.spawn(move || node(nb));
            (ha.join().unwrap(), hb.join().unwrap())
        });
        assert_eq!(ra.stored + rb.stored, per, "round {round}: {ra:?} {rb:?}");
        assert_eq!(
            ra.duplicates + rb.duplicates,
            per,
            "round {round}: {ra:?} {rb:?}"
        );
    }
    // Both nodes, and a third opened afterwards, see every item once.
    let c = Dataset::open(dir.path(), false).unwrap();
    for ds in [&a, &b, &c] {
        ds.refresh(std::time::Duration::ZERO).unwrap();
        let ledger = &ds.edges()["e1"];
        assert_eq!(ledger.received.ranges(), &[(1, rounds * per)]);
    }
    let df =
        millrace_cloud::dataset::read_files(&c.files(Table::Events, None, None).unwrap()).unwrap();
    let seqs = df.column("outbox_seq").unwrap().n_unique().unwrap();
    assert_eq!(seqs, df.height(), "no event row twice");
    let want = (1..=rounds * per)
        .filter(|s| s % 10 == 0 || s % 10 == 5)
        .count();
    assert_eq!(df.height(), want);
}
