//! Machine states over time. Each state change lasts until the same machine's next one (the last
//! until the end of the range, or now); the state at the start of a range is the last change in
//! the day before it. The OEE tallies and the state timeline both walk these changes.

use std::collections::HashMap;

use millrace_shared::{MachineState, StopReason};
use polars::prelude::*;
use serde::Serialize;

use super::{DAY_MS, ints, str_col};
use crate::dataset::{Dataset, Table};
use crate::query::{QueryError, Selection, scan};
use crate::schema::events;

/// `(site, line, machine)`, borrowed from a frame.
type MachineKey<'a> = (&'a str, &'a str, &'a str);

/// One state change of a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Change {
    /// When, Unix ms.
    pub ts: i64,
    /// The state entered (`None`: a state this version does not know; it still ends the one
    /// before).
    pub state: Option<MachineState>,
    /// The reason given, as an index into [`StateChanges::reasons`].
    pub reason: Option<usize>,
}

/// The state changes of every machine in a selection, each machine's in time order.
#[derive(Debug, Default)]
pub(super) struct StateChanges {
    /// `(site, line, machine)` and its changes, oldest first.
    pub machines: Vec<((String, String, String), Vec<Change>)>,
    /// The distinct reason texts, each with the reason it names (if it is a known one).
    pub reasons: Vec<(String, Option<StopReason>)>,
    /// Where the walks end: the selection's end, or now if that is earlier.
    pub end_ms: i64,
}

impl StateChanges {
    /// The state changes that decide the states in `sel` (a day before it included).
    pub(super) fn load(ds: &Dataset, sel: &Selection) -> Result<Self, QueryError> {
        let end_ms = sel.to_ms.min(chrono::Utc::now().timestamp_millis());
        let mut out = Self {
            end_ms,
            ..Self::default()
        };
        let wide = sel.with_range(sel.from_ms - DAY_MS, sel.to_ms);
        let Some(lf) = scan(ds, Table::Events, &wide)? else {
            return Ok(out);
        };
        let df = lf
            .filter(col(events::KIND).eq(lit(events::KIND_STATE)))
            .select([
                col(events::SITE),
                col(events::LINE),
                col(events::MACHINE),
                col(events::TS).cast(DataType::Int64),
                col(events::DEVICE_SEQ),
                col(events::STATE),
                col(events::REASON),
            ])
            .collect()?;
        let (site, line, machine) = (
            str_col(&df, events::SITE)?,
            str_col(&df, events::LINE)?,
            str_col(&df, events::MACHINE)?,
        );
        let (ts, dseq) = (ints(&df, events::TS)?, ints(&df, events::DEVICE_SEQ)?);
        let (state, reason) = (str_col(&df, events::STATE)?, str_col(&df, events::REASON)?);
        // Reasons parsed once per distinct text.
        let mut reason_ids: HashMap<&str, usize> = HashMap::new();
        // Per machine: (time, device seq, change), sorted below.
        let mut by_machine: HashMap<MachineKey<'_>, Vec<(i64, i64, Change)>> = HashMap::new();
        for i in 0..df.height() {
            let reason = reason[i].map(|r| {
                *reason_ids.entry(r).or_insert_with(|| {
                    let known = serde_json::from_value::<StopReason>(serde_json::Value::String(
                        r.to_owned(),
                    ))
                    .ok();
                    out.reasons.push((r.to_owned(), known));
                    out.reasons.len() - 1
                })
            });
            let change = Change {
                ts: ts[i],
                state: state[i]
                    .and_then(|s| MachineState::ALL.into_iter().find(|x| x.as_str() == s)),
                reason,
            };
            by_machine
                .entry((
                    site[i].unwrap_or_default(),
                    line[i].unwrap_or_default(),
                    machine[i].unwrap_or_default(),
                ))
                .or_default()
                .push((ts[i], dseq[i], change));
        }
        out.machines = by_machine
            .into_iter()
            .map(|((s, l, m), mut rows)| {
                rows.sort_unstable_by_key(|r| (r.0, r.1));
                (
                    (s.to_owned(), l.to_owned(), m.to_owned()),
                    rows.into_iter().map(|r| r.2).collect(),
                )
            })
            .collect();
        out.machines.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The reason a change gave, if it is a known one.
    pub(super) fn reason_of(&self, c: &Change) -> Option<StopReason> {
        c.reason.and_then(|i| self.reasons[i].1)
    }
}

/// One interval of the state timeline: a machine in one state (and reason) from `start_ms` to
/// `end_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct StateInterval {
    /// `site/line/machine`.
    pub machine: String,
    /// `running`, `idle`, `planned_stop`, `changeover` or `down`.
    pub state: &'static str,
    /// The reason the machine gave, if any (e.g. `technical_failure`, `break`).
    pub reason: Option<String>,
    /// Start (inclusive), Unix ms.
    pub start_ms: i64,
    /// End (exclusive), Unix ms.
    pub end_ms: i64,
    /// Only in a timeline asked for at a `resolution`: how many intervals, each shorter than
    /// it, this one stands for (its `state` is the one they spent most time in, `reason` none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merged: Option<u32>,
    /// With `merged`: the milliseconds spent in each state inside this interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_ms: Option<std::collections::BTreeMap<&'static str, i64>>,
}

/// The timeline drawn at `resolution_ms` (e.g. the range over the chart's width in pixels):
/// runs of consecutive intervals shorter than it become one interval of the state they spent
/// most time in (ties: the first), with `merged` and `state_ms` telling what it holds, closed
/// once the run is `resolution_ms` long. Intervals at least that long, and time not covered, are
/// kept as they are, so each machine has at most about two intervals per `resolution_ms`.
pub fn downsample(intervals: Vec<StateInterval>, resolution_ms: i64) -> Vec<StateInterval> {
    /// A run of short intervals of one machine, back to back.
    struct Run {
        items: Vec<StateInterval>,
    }
    impl Run {
        fn span(&self) -> i64 {
            self.items.last().map_or(0, |l| l.end_ms) - self.items.first().map_or(0, |f| f.start_ms)
        }
        fn flush(&mut self, out: &mut Vec<StateInterval>) {
            match self.items.len() {
                0 => {}
                1 => out.append(&mut self.items),
                n => {
                    // First seen first: ties go to the earlier state.
                    let mut by_state: Vec<(&'static str, i64)> = Vec::new();
                    for i in &self.items {
                        let d = i.end_ms - i.start_ms;
                        match by_state.iter_mut().find(|(s, _)| *s == i.state) {
                            Some((_, ms)) => *ms += d,
                            None => by_state.push((i.state, d)),
                        }
                    }
                    let state = by_state
                        .iter()
                        .fold(by_state[0], |best, x| if x.1 > best.1 { *x } else { best })
                        .0;
                    let first = &self.items[0];
                    out.push(StateInterval {
                        machine: first.machine.clone(),
                        state,
                        reason: None,
                        start_ms: first.start_ms,
                        end_ms: self.items[n - 1].end_ms,
                        merged: Some(u32::try_from(n).unwrap_or(u32::MAX)),
                        state_ms: Some(by_state.into_iter().collect()),
                    });
                    self.items.clear();
                }
            }
        }
    }
    if resolution_ms <= 1 {
        return intervals;
    }
    let mut out = Vec::with_capacity(intervals.len());
    let mut run = Run { items: Vec::new() };
    for i in intervals {
        if let Some(last) = run.items.last()
            && (last.machine != i.machine || last.end_ms != i.start_ms)
        {
            run.flush(&mut out);
        }
        if i.end_ms - i.start_ms >= resolution_ms {
            run.flush(&mut out);
            out.push(i);
            continue;
        }
        run.items.push(i);
        if run.span() >= resolution_ms {
            run.flush(&mut out);
        }
    }
    run.flush(&mut out);
    out
}

/// The state timeline over `sel`: per machine (in name order) the intervals of each state, cut
/// to the range (and to now), consecutive changes to the same state and reason merged into one
/// interval. Time before a machine's first known state, and in a state this version does not
/// know, is not covered.
pub fn state_timeline(ds: &Dataset, sel: &Selection) -> Result<Vec<StateInterval>, QueryError> {
    let changes = StateChanges::load(ds, sel)?;
    let mut out: Vec<StateInterval> = Vec::new();
    for ((site, line, machine), list) in &changes.machines {
        let name = format!("{site}/{line}/{machine}");
        let first = out.len();
        for (k, c) in list.iter().enumerate() {
            let next = list.get(k + 1).map_or(changes.end_ms, |n| n.ts);
            let (lo, hi) = (c.ts.max(sel.from_ms), next.min(changes.end_ms));
            let Some(state) = c.state else { continue };
            if hi <= lo {
                continue;
            }
            let reason = c.reason.map(|i| changes.reasons[i].0.as_str());
            if let Some(last) = out[first..].last_mut()
                && last.end_ms == lo
                && last.state == state.as_str()
                && last.reason.as_deref() == reason
            {
                last.end_ms = hi;
                continue;
            }
            out.push(StateInterval {
                machine: name.clone(),
                state: state.as_str(),
                reason: reason.map(str::to_owned),
                start_ms: lo,
                end_ms: hi,
                merged: None,
                state_ms: None,
            });
        }
    }
    Ok(out)
}
