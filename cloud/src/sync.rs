//! The receiving end of sync: an edge's batch decoded, its items already held dropped, its rows
//! laid out per table and partition, and written as one commit of the dataset.
//!
//! A batch is acknowledged only after [`receive`] returns, that is after its commit is durable
//! ([`crate::dataset`]); items whose `(edge, outbox seq)` the dataset holds already are counted
//! as duplicates and not written again, so a batch re-sent after a lost answer is stored once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use millrace_shared::sync::{
    AlertItem, RangeSet, SeqRange, SyncAck, SyncBatch, SyncItem, WireError,
};
use millrace_shared::{EventBody, PartOutcome};
use polars::prelude::*;
use serde::Serialize;

use crate::dataset::{Dataset, DatasetError, Table};
use crate::schema::{alerts, events, part_counts, telemetry};

const MINUTE_MS: i64 = 60_000;
const DAY_MS: i64 = 86_400_000;

/// Why a batch was not stored.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The body is not a readable batch (or too large once decompressed).
    #[error("batch not readable: {0}")]
    Unreadable(#[from] WireError),
    /// The batch names another edge than the token it came with.
    #[error("this token belongs to edge `{token}`, the batch says `{batch}`")]
    WrongEdge {
        /// The edge of the token.
        token: String,
        /// The edge the batch names.
        batch: String,
    },
    /// The dataset could not store it.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
}

impl SyncError {
    /// Whether sending the same batch again later may work.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Dataset(e) if e.is_retryable())
    }
}

impl From<PolarsError> for SyncError {
    fn from(e: PolarsError) -> Self {
        Self::Dataset(e.into())
    }
}

/// Decodes the body an edge sent (`edge`: the edge its token belongs to), and stores it durably
/// and once. Returns the acknowledgement and the function figures the batch reported. Blocks
/// (decompression, Parquet, fsync): call it off the async runtime.
pub fn receive(
    ds: &Dataset,
    edge: &str,
    body: &[u8],
    max_raw_bytes: usize,
    received_ms: i64,
) -> Result<(SyncAck, SyncBatch), SyncError> {
    let batch = SyncBatch::decode(body, max_raw_bytes)?;
    if batch.edge != edge {
        return Err(SyncError::WrongEdge {
            token: edge.to_owned(),
            batch: batch.edge,
        });
    }
    let ack = if batch.items.is_empty() && batch.alerts.is_empty() && batch.dropped.is_empty() {
        // Only the functions' figures: nothing to commit.
        SyncAck {
            stored: 0,
            duplicates: 0,
            points: 0,
        }
    } else {
        store(
            ds,
            edge,
            &batch.items,
            &batch.alerts,
            &batch.dropped,
            received_ms,
        )?
    };
    // The batch comes back without its items: its reports are what the caller needs.
    let reports = SyncBatch {
        items: vec![],
        alerts: vec![],
        ..batch
    };
    Ok((ack, reports))
}

/// Stores the items and alerts of a decoded batch from `edge` (and the ranges it reported
/// `dropped`) durably; those already held are skipped and counted. When another node stores
/// some of the same edge's data at the same moment, the batch is checked and stored again
/// (what that node stored now counts as duplicates). Blocks.
pub fn store(
    ds: &Dataset,
    edge: &str,
    items: &[SyncItem],
    alert_items: &[AlertItem],
    dropped: &[SeqRange],
    received_ms: i64,
) -> Result<SyncAck, SyncError> {
    let mut attempt = 0;
    // Sequence numbers this node stored in an attempt that then lost a race on a later table:
    // stored by this delivery, not duplicates, when the next attempt finds them held.
    let mut ours = HashSet::new();
    loop {
        match store_once(
            ds,
            edge,
            items,
            alert_items,
            dropped,
            received_ms,
            &mut ours,
        ) {
            Err(SyncError::Dataset(DatasetError::Conflict(table))) if attempt < 10 => {
                attempt += 1;
                tracing::info!(
                    edge,
                    table,
                    attempt,
                    "another node stored some of this edge's data meanwhile; checking the batch again"
                );
            }
            r => return r,
        }
    }
}

fn store_once(
    ds: &Dataset,
    edge: &str,
    items: &[SyncItem],
    alert_items: &[AlertItem],
    dropped: &[SeqRange],
    received_ms: i64,
    ours: &mut HashSet<u64>,
) -> Result<SyncAck, SyncError> {
    let commit = ds.begin_commit(edge, received_ms);
    let held = commit.held();
    // Each item's table (part events: also the part counts') decides alone: a crash between
    // two tables' commits leaves the other tables to the retry.
    let mut seen = HashSet::new();
    let primary = |it: &SyncItem| match it.event.body {
        EventBody::Telemetry(_) => Table::Telemetry,
        _ => Table::Events,
    };
    let fresh: Vec<&SyncItem> = items
        .iter()
        .filter(|it| !held(primary(it).as_str(), it.seq) && seen.insert(it.seq))
        .collect();
    let mut seen_parts = HashSet::new();
    let fresh_parts: Vec<&SyncItem> = items
        .iter()
        .filter(|it| matches!(it.event.body, EventBody::Part(_)))
        .filter(|it| !held(Table::PartCounts.as_str(), it.seq) && seen_parts.insert(it.seq))
        .collect();
    let fresh_alerts: Vec<&AlertItem> = alert_items
        .iter()
        .filter(|a| !held(Table::Alerts.as_str(), a.seq) && seen.insert(a.seq))
        .collect();
    let reclaimed = items
        .iter()
        .map(|it| it.seq)
        .chain(alert_items.iter().map(|a| a.seq))
        .filter(|s| ours.contains(s))
        .collect::<HashSet<u64>>()
        .len() as u64;
    let duplicates =
        (items.len() - fresh.len() + alert_items.len() - fresh_alerts.len()) as u64 - reclaimed;
    let complete = ds.edges().get(edge).is_some_and(|l| {
        items.iter().all(|it| l.received.contains(it.seq))
            && alert_items.iter().all(|a| l.received.contains(a.seq))
            && {
                let mut d = RangeSet::default();
                for &(a, b) in dropped {
                    d.insert(a, b);
                }
                d.intersection_len(&l.dropped) == d.len()
            }
    });
    drop(held);
    if complete {
        // A batch sent again whole (its answer was lost): nothing to commit.
        return Ok(SyncAck {
            stored: reclaimed,
            duplicates,
            points: 0,
        });
    }
    let mut commit = commit;
    let mut parts: HashMap<(Table, String, &str), Rows<'_>> = HashMap::new();
    // By day (days since 1970), then machine and minute.
    let mut counts: BTreeMap<i64, BTreeMap<CountKey<'_>, [u64; 3]>> = BTreeMap::new();
    let mut points = 0u64;
    for it in &fresh {
        let e = &it.event;
        let date = date_of(e.ts_ms);
        match &e.body {
            EventBody::Telemetry(t) => {
                let rows = parts
                    .entry((Table::Telemetry, date, e.machine.site.as_str()))
                    .or_default();
                for r in &t.readings {
                    rows.common(edge, it);
                    rows.metric.push(&r.name);
                    rows.unit.push(&r.unit);
                    rows.value.push(r.value);
                    points += 1;
                }
            }
            body => {
                let rows = parts
                    .entry((Table::Events, date, e.machine.site.as_str()))
                    .or_default();
                rows.common(edge, it);
                rows.kind.push(body.kind().as_str());
                let (mut st, mut rs, mut oc, mut ct, mut pi, mut ac, mut op) =
                    (None, None, None, None, None, None, None);
                match body {
                    EventBody::State(s) => {
                        st = Some(enum_name(&s.state));
                        rs = s.reason.as_ref().map(enum_name);
                    }
                    EventBody::Part(p) => {
                        oc = Some(enum_name(&p.outcome));
                        ct = Some(p.cycle_time_ms);
                        pi = p.part_id.as_deref();
                    }
                    EventBody::Operator(o) => {
                        ac = Some(enum_name(&o.action));
                        op = Some(o.operator.as_str());
                    }
                    EventBody::Telemetry(_) => unreachable!("handled above"),
                }
                rows.state.push(st);
                rows.reason.push(rs);
                rows.outcome.push(oc);
                rows.cycle_time_ms.push(ct);
                rows.part_id.push(pi);
                rows.action.push(ac);
                rows.operator.push(op);
            }
        }
    }
    for it in &fresh_parts {
        let (e, EventBody::Part(p)) = (&it.event, &it.event.body) else {
            unreachable!("parts only")
        };
        let minute = e.ts_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
        let c = counts
            .entry(minute.div_euclid(DAY_MS))
            .or_default()
            .entry((&e.machine.site, &e.machine.line, &e.machine.machine, minute))
            .or_default();
        c[match p.outcome {
            PartOutcome::Good => 0,
            PartOutcome::Scrap => 1,
            PartOutcome::Rework => 2,
        }] += 1;
    }
    for ((table, date, site), rows) in parts {
        let mut df = rows.frame(table, site, received_ms)?;
        commit.write(table, date, site, &mut df)?;
    }
    for (day, by_key) in counts {
        let date = date_of(day * DAY_MS);
        let mut by_site: BTreeMap<&str, Vec<(&CountKey<'_>, &[u64; 3])>> = BTreeMap::new();
        for (k, c) in &by_key {
            by_site.entry(k.0).or_default().push((k, c));
        }
        for (site, rows) in by_site {
            let mut df = part_counts_frame(site, &rows)?;
            commit.write(Table::PartCounts, date.clone(), site, &mut df)?;
        }
    }
    let mut by_partition: BTreeMap<(String, String), Vec<&AlertItem>> = BTreeMap::new();
    // Of every item (a batch stored in part before a crash names its machines too).
    let mut machines: BTreeSet<String> = items
        .iter()
        .map(|it| it.event.machine.to_string())
        .collect();
    machines.extend(
        alert_items
            .iter()
            .filter_map(|a| a.alert.machine())
            .map(|m| m.to_string()),
    );
    for a in &fresh_alerts {
        let site = match a.alert.machine() {
            Some(m) => m.site.to_string(),
            None => alerts::NO_SITE.to_owned(),
        };
        by_partition
            .entry((date_of(a.alert.ts_ms), site))
            .or_default()
            .push(a);
    }
    for ((date, site), rows) in by_partition {
        let mut df = alerts_frame(edge, &rows, received_ms)?;
        commit.write(Table::Alerts, date, &site, &mut df)?;
    }
    // Every item of the batch: each table committed now holds its share of them.
    let mut seqs = RangeSet::default();
    seqs.extend(items.iter().map(|it| it.seq));
    seqs.extend(alert_items.iter().map(|a| a.seq));
    let stored = (fresh.len() + fresh_alerts.len()) as u64 + reclaimed;
    let mut committed = vec![];
    let finished = commit.finish(
        &seqs,
        dropped,
        machines.into_iter().collect(),
        (stored, duplicates, points),
        &mut committed,
    );
    if let Err(DatasetError::Conflict(_)) = &finished {
        // The tables committed before the race was lost hold this delivery's rows.
        ours.extend(
            fresh
                .iter()
                .filter(|it| committed.contains(&primary(it).as_str()))
                .map(|it| it.seq),
        );
        if committed.contains(&Table::Alerts.as_str()) {
            ours.extend(fresh_alerts.iter().map(|a| a.seq));
        }
    }
    finished?;
    if !fresh_alerts.is_empty() {
        metrics::counter!("millrace_cloud_alerts_total", "edge" => edge.to_owned())
            .increment(fresh_alerts.len() as u64);
    }
    Ok(SyncAck {
        stored,
        duplicates,
        points,
    })
}

/// The rows of one alerts partition.
fn alerts_frame(edge: &str, rows: &[&AlertItem], received_ms: i64) -> PolarsResult<DataFrame> {
    let n = rows.len();
    let machines: Vec<Option<millrace_shared::MachineId>> =
        rows.iter().map(|a| a.alert.machine()).collect();
    let part = |f: fn(&millrace_shared::MachineId) -> &str| -> Vec<Option<&str>> {
        machines.iter().map(|m| m.as_ref().map(f)).collect()
    };
    let time = |name: &str, v: Vec<i64>| {
        Column::new(name.into(), v).cast(&DataType::Datetime(TimeUnit::Milliseconds, None))
    };
    let text = |name: &str, f: fn(&millrace_shared::Alert) -> &str| {
        Column::new(
            name.into(),
            rows.iter().map(|a| f(&a.alert)).collect::<Vec<_>>(),
        )
    };
    let cols = vec![
        Column::new(alerts::SITE.into(), part(|m| &m.site)),
        Column::new(alerts::LINE.into(), part(|m| &m.line)),
        Column::new(alerts::MACHINE.into(), part(|m| &m.machine)),
        time(alerts::TS, rows.iter().map(|a| a.alert.ts_ms).collect())?,
        text(alerts::ID, |a| &a.id),
        text(alerts::FUNCTION, |a| &a.function),
        Column::new(
            alerts::VERSION.into(),
            rows.iter().map(|a| a.alert.version).collect::<Vec<u32>>(),
        ),
        text(alerts::SEVERITY, |a| &a.severity),
        text(alerts::MESSAGE, |a| &a.message),
        text(alerts::TRIGGER, |a| &a.trigger),
        Column::new(
            alerts::TOPIC.into(),
            rows.iter()
                .map(|a| Some(a.alert.topic.as_str()).filter(|t| !t.is_empty()))
                .collect::<Vec<_>>(),
        ),
        time(
            alerts::EVENT_TS,
            rows.iter().map(|a| a.alert.event_ts_ms).collect(),
        )?,
        Column::new(alerts::EDGE.into(), vec![edge; n]),
        Column::new(
            alerts::OUTBOX_SEQ.into(),
            rows.iter().map(|a| a.seq).collect::<Vec<u64>>(),
        ),
        Column::new(
            alerts::BACKFILL.into(),
            rows.iter().map(|a| a.backfill).collect::<Vec<bool>>(),
        ),
        time(alerts::RECEIVED_AT, vec![received_ms; n])?,
    ];
    debug_assert_eq!(
        cols.iter().map(|c| c.name().as_str()).collect::<Vec<_>>(),
        alerts::COLUMNS
    );
    DataFrame::new(n, cols)
}

/// Site, line, machine, minute.
type CountKey<'b> = (&'b str, &'b str, &'b str, i64);

/// The part-counts rows of one site (counts in the order of [`part_counts::COUNTS`]).
fn part_counts_frame(site: &str, rows: &[(&CountKey<'_>, &[u64; 3])]) -> PolarsResult<DataFrame> {
    let n = rows.len();
    let mut cols = vec![
        Column::new(part_counts::SITE.into(), vec![site; n]),
        Column::new(
            part_counts::LINE.into(),
            rows.iter().map(|r| r.0.1).collect::<Vec<_>>(),
        ),
        Column::new(
            part_counts::MACHINE.into(),
            rows.iter().map(|r| r.0.2).collect::<Vec<_>>(),
        ),
        Column::new(
            part_counts::MINUTE.into(),
            rows.iter().map(|r| r.0.3).collect::<Vec<_>>(),
        ),
    ];
    for (i, name) in part_counts::COUNTS.into_iter().enumerate() {
        cols.push(Column::new(
            name.into(),
            rows.iter().map(|r| r.1[i]).collect::<Vec<u64>>(),
        ));
    }
    debug_assert_eq!(
        cols.iter().map(|c| c.name().as_str()).collect::<Vec<_>>(),
        part_counts::COLUMNS
    );
    DataFrame::new(n, cols)
}

pub(crate) fn date_of(ts_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ts_ms)
        .map_or_else(|| "invalid".into(), |d| d.format("%Y-%m-%d").to_string())
}

/// Rows of one batch for one partition, borrowing the batch's strings (no copy per row).
#[derive(Default)]
struct Rows<'a> {
    edge: &'a str,
    oseq: Vec<u64>,
    line: Vec<&'a str>,
    machine: Vec<&'a str>,
    ts: Vec<i64>,
    dseq: Vec<u64>,
    backfill: Vec<bool>,
    // telemetry
    metric: Vec<&'a str>,
    unit: Vec<&'a str>,
    value: Vec<f64>,
    // events
    kind: Vec<&'static str>,
    state: Vec<Option<String>>,
    reason: Vec<Option<String>>,
    outcome: Vec<Option<String>>,
    cycle_time_ms: Vec<Option<u32>>,
    part_id: Vec<Option<&'a str>>,
    action: Vec<Option<String>>,
    operator: Vec<Option<&'a str>>,
}

fn enum_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

impl<'a> Rows<'a> {
    fn common(&mut self, edge: &'a str, it: &'a SyncItem) {
        self.edge = edge;
        self.oseq.push(it.seq);
        self.line.push(&it.event.machine.line);
        self.machine.push(&it.event.machine.machine);
        self.ts.push(it.event.ts_ms);
        self.dseq.push(it.event.seq);
        self.backfill.push(it.backfill);
    }

    fn len(&self) -> usize {
        self.oseq.len()
    }

    fn frame(self, table: Table, site: &str, received_ms: i64) -> PolarsResult<DataFrame> {
        let n = self.len();
        let ts = Column::new(events::TS.into(), self.ts)
            .cast(&DataType::Datetime(TimeUnit::Milliseconds, None))?;
        let received = Column::new(events::RECEIVED_AT.into(), vec![received_ms; n])
            .cast(&DataType::Datetime(TimeUnit::Milliseconds, None))?;
        let mut cols = vec![
            Column::new(events::SITE.into(), vec![site; n]),
            Column::new(events::LINE.into(), self.line),
            Column::new(events::MACHINE.into(), self.machine),
            ts,
            Column::new(events::DEVICE_SEQ.into(), self.dseq),
        ];
        match table {
            Table::Telemetry => cols.extend([
                Column::new(telemetry::METRIC.into(), self.metric),
                Column::new(telemetry::UNIT.into(), self.unit),
                Column::new(telemetry::VALUE.into(), self.value),
            ]),
            Table::PartCounts | Table::Alerts => {
                unreachable!("part counts and alerts are not built from rows")
            }
            Table::Events => cols.extend([
                Column::new(events::KIND.into(), self.kind),
                Column::new(events::STATE.into(), self.state),
                Column::new(events::REASON.into(), self.reason),
                Column::new(events::OUTCOME.into(), self.outcome),
                Column::new(events::CYCLE_TIME_MS.into(), self.cycle_time_ms),
                Column::new(events::PART_ID.into(), self.part_id),
                Column::new(events::ACTION.into(), self.action),
                Column::new(events::OPERATOR.into(), self.operator),
            ]),
        }
        cols.extend([
            Column::new(events::EDGE.into(), vec![self.edge; n]),
            Column::new(events::OUTBOX_SEQ.into(), self.oseq),
            Column::new(events::BACKFILL.into(), self.backfill),
            received,
        ]);
        debug_assert_eq!(
            cols.iter().map(|c| c.name().as_str()).collect::<Vec<_>>(),
            match table {
                Table::Telemetry => telemetry::COLUMNS,
                _ => events::COLUMNS,
            }
        );
        DataFrame::new(n, cols)
    }
}
