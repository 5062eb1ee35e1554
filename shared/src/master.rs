//! Master data: machines with their ideal cycle time, and the shift calendar.
//!
//! The calendar is a list of daily shifts in UTC (`HH:MM` start and end; a shift whose end is
//! not after its start runs past midnight), each with planned breaks. A shift instance is named
//! by the shift's name and the UTC date it starts on. Planned production time of a shift is its
//! length minus its breaks; machines report breaks and the time outside shifts as
//! `planned_stop` (reasons `break` and `no_shift`), so the calendar and the event data agree.

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, Utc};
use serde::{Deserialize, Serialize};

use crate::topic::MachineId;

/// A machine and its ideal cycle time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineSpec {
    /// Site, line and machine.
    #[serde(flatten)]
    pub id: MachineId,
    /// The fastest a part can be made, in ms (ISO 22400 planned/ideal cycle time).
    pub ideal_cycle_time_ms: u32,
}

/// A planned break within a shift.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakDef {
    /// Start, `HH:MM` UTC.
    pub start: NaiveTime,
    /// Length in minutes.
    pub minutes: u32,
}

/// One daily shift.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShiftDef {
    /// Name, e.g. `early`.
    pub name: String,
    /// Start, `HH:MM` UTC.
    pub start: NaiveTime,
    /// End, `HH:MM` UTC; not after `start` means the next day.
    pub end: NaiveTime,
    /// Planned breaks.
    #[serde(default)]
    pub breaks: Vec<BreakDef>,
}

/// Why a calendar was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalendarError {
    /// Two shifts share a name.
    #[error("shift name `{0}` is used twice")]
    DuplicateName(String),
    /// A break lies outside its shift.
    #[error("break at {start} ({minutes} min) lies outside shift `{shift}`")]
    BreakOutside {
        /// The shift.
        shift: String,
        /// The break's start.
        start: NaiveTime,
        /// The break's length.
        minutes: u32,
    },
    /// Two shifts overlap.
    #[error("shifts `{0}` and `{1}` overlap")]
    Overlap(String, String),
    /// A shift has an empty name.
    #[error("a shift has an empty name")]
    EmptyName,
}

/// The daily shift pattern of a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShiftCalendar {
    /// The shifts, each repeated every day.
    pub shifts: Vec<ShiftDef>,
}

/// One occurrence of a shift.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShiftInstance {
    /// The shift's name.
    pub name: String,
    /// The UTC date the shift starts on.
    pub date: NaiveDate,
    /// Start, Unix ms.
    pub start_ms: i64,
    /// End (exclusive), Unix ms.
    pub end_ms: i64,
    /// Breaks as `[start, end)` Unix ms.
    pub breaks: Vec<(i64, i64)>,
}

impl ShiftInstance {
    /// A stable id: `{date}/{name}`, e.g. `2026-01-05/early`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.date, self.name)
    }

    /// Planned production time: length minus breaks.
    pub fn planned_ms(&self) -> i64 {
        self.end_ms - self.start_ms - self.breaks.iter().map(|(s, e)| e - s).sum::<i64>()
    }
}

/// Where a moment falls in the calendar, and until when that holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalendarSlot {
    /// The shift the moment is in, if any.
    pub shift: Option<ShiftInstance>,
    /// Whether the moment is in one of that shift's breaks.
    pub in_break: bool,
    /// The next boundary (shift or break start or end) after the moment.
    pub until_ms: i64,
}

impl CalendarSlot {
    /// Whether production is planned at this moment.
    pub const fn is_production(&self) -> bool {
        self.shift.is_some() && !self.in_break
    }
}

const DAY_MS: i64 = 86_400_000;

fn ms_of(date: NaiveDate, t: NaiveTime) -> i64 {
    date.and_time(t).and_utc().timestamp_millis()
}

impl Default for ShiftCalendar {
    /// Two eight-hour shifts, 06:00–14:00 and 14:00–22:00, each with a 30-minute break; no
    /// production at night.
    fn default() -> Self {
        let t = |h, m| NaiveTime::from_hms_opt(h, m, 0).expect("valid time");
        Self {
            shifts: vec![
                ShiftDef {
                    name: "early".into(),
                    start: t(6, 0),
                    end: t(14, 0),
                    breaks: vec![BreakDef {
                        start: t(10, 0),
                        minutes: 30,
                    }],
                },
                ShiftDef {
                    name: "late".into(),
                    start: t(14, 0),
                    end: t(22, 0),
                    breaks: vec![BreakDef {
                        start: t(18, 0),
                        minutes: 30,
                    }],
                },
            ],
        }
    }
}

impl ShiftCalendar {
    /// A calendar in which every moment is planned production time, as one shift a day.
    pub fn around_the_clock() -> Self {
        let midnight = NaiveTime::MIN;
        Self {
            shifts: vec![ShiftDef {
                name: "day".into(),
                start: midnight,
                end: midnight,
                breaks: vec![],
            }],
        }
    }

    /// Checks names, breaks and overlaps.
    pub fn validate(&self) -> Result<(), CalendarError> {
        let mut names = std::collections::BTreeSet::new();
        for s in &self.shifts {
            if s.name.is_empty() {
                return Err(CalendarError::EmptyName);
            }
            if !names.insert(&s.name) {
                return Err(CalendarError::DuplicateName(s.name.clone()));
            }
        }
        // Lay out two days of instances and check them against each other.
        let d0 = NaiveDate::from_ymd_opt(2026, 1, 5).expect("valid date");
        let instances: Vec<ShiftInstance> = (0..2)
            .flat_map(|i| self.instances_on(d0 + Duration::days(i)))
            .collect();
        for (def, inst) in self.shifts.iter().zip(self.instances_on(d0)) {
            for (b, (bs, be)) in def.breaks.iter().zip(&inst.breaks) {
                if *bs < inst.start_ms || *be > inst.end_ms {
                    return Err(CalendarError::BreakOutside {
                        shift: def.name.clone(),
                        start: b.start,
                        minutes: b.minutes,
                    });
                }
            }
        }
        for (i, a) in instances.iter().enumerate() {
            for b in &instances[i + 1..] {
                if a.start_ms < b.end_ms && b.start_ms < a.end_ms {
                    return Err(CalendarError::Overlap(a.name.clone(), b.name.clone()));
                }
            }
        }
        Ok(())
    }

    /// The shift instances that start on `date`.
    pub fn instances_on(&self, date: NaiveDate) -> Vec<ShiftInstance> {
        self.shifts
            .iter()
            .map(|s| {
                let start_ms = ms_of(date, s.start);
                let mut end_ms = ms_of(date, s.end);
                if end_ms <= start_ms {
                    end_ms += DAY_MS;
                }
                let breaks = s
                    .breaks
                    .iter()
                    .map(|b| {
                        let mut bs = ms_of(date, b.start);
                        if bs < start_ms {
                            bs += DAY_MS;
                        }
                        (bs, bs + i64::from(b.minutes) * 60_000)
                    })
                    .collect();
                ShiftInstance {
                    name: s.name.clone(),
                    date,
                    start_ms,
                    end_ms,
                    breaks,
                }
            })
            .collect()
    }

    /// The shift instances that overlap `[from_ms, to_ms)`, in time order.
    pub fn instances_between(&self, from_ms: i64, to_ms: i64) -> Vec<ShiftInstance> {
        let Some(first) = DateTime::<Utc>::from_timestamp_millis(from_ms) else {
            return vec![];
        };
        let mut out = vec![];
        let mut date = first.date_naive() - Duration::days(1);
        while ms_of(date, NaiveTime::MIN) < to_ms {
            out.extend(
                self.instances_on(date)
                    .into_iter()
                    .filter(|i| i.start_ms < to_ms && i.end_ms > from_ms),
            );
            date += Duration::days(1);
        }
        out.sort_by_key(|i| i.start_ms);
        out
    }

    /// Where `ts_ms` falls, and until when.
    pub fn slot_at(&self, ts_ms: i64) -> CalendarSlot {
        let around = self.instances_between(ts_ms - DAY_MS, ts_ms + 2 * DAY_MS);
        let mut until_ms = ts_ms + DAY_MS;
        let mut shift = None;
        let mut in_break = false;
        for inst in around {
            for edge in [inst.start_ms, inst.end_ms]
                .into_iter()
                .chain(inst.breaks.iter().flat_map(|(s, e)| [*s, *e]))
            {
                if edge > ts_ms {
                    until_ms = until_ms.min(edge);
                }
            }
            if inst.start_ms <= ts_ms && ts_ms < inst.end_ms {
                in_break = inst.breaks.iter().any(|(s, e)| *s <= ts_ms && ts_ms < *e);
                shift = Some(inst);
            }
        }
        CalendarSlot {
            shift,
            in_break,
            until_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn default_calendar_slots() {
        let cal = ShiftCalendar::default();
        cal.validate().unwrap();
        let s = cal.slot_at(ts("2026-01-05T07:00:00Z"));
        assert!(s.is_production());
        assert_eq!(s.shift.as_ref().unwrap().id(), "2026-01-05/early");
        assert_eq!(s.until_ms, ts("2026-01-05T10:00:00Z"));
        let s = cal.slot_at(ts("2026-01-05T10:10:00Z"));
        assert!(s.in_break && !s.is_production());
        assert_eq!(s.until_ms, ts("2026-01-05T10:30:00Z"));
        let s = cal.slot_at(ts("2026-01-05T23:00:00Z"));
        assert!(s.shift.is_none());
        assert_eq!(s.until_ms, ts("2026-01-06T06:00:00Z"));
        let s = cal.slot_at(ts("2026-01-05T14:00:00Z"));
        assert_eq!(s.shift.unwrap().name, "late");
        let early = &cal.instances_on(NaiveDate::from_ymd_opt(2026, 1, 5).unwrap())[0];
        assert_eq!(early.planned_ms(), 7 * 3_600_000 + 1_800_000);
    }

    #[test]
    fn night_shifts_cross_midnight() {
        let t = |h| NaiveTime::from_hms_opt(h, 0, 0).unwrap();
        let cal = ShiftCalendar {
            shifts: vec![ShiftDef {
                name: "night".into(),
                start: t(22),
                end: t(6),
                breaks: vec![BreakDef {
                    start: t(2),
                    minutes: 30,
                }],
            }],
        };
        cal.validate().unwrap();
        let s = cal.slot_at(ts("2026-01-06T01:00:00Z"));
        assert_eq!(s.shift.as_ref().unwrap().id(), "2026-01-05/night");
        assert_eq!(s.until_ms, ts("2026-01-06T02:00:00Z"));
        let all = cal.instances_between(ts("2026-01-05T00:00:00Z"), ts("2026-01-07T00:00:00Z"));
        assert_eq!(
            all.iter().map(ShiftInstance::id).collect::<Vec<_>>(),
            ["2026-01-04/night", "2026-01-05/night", "2026-01-06/night"]
        );
    }

    #[test]
    fn bad_calendars_are_refused() {
        let t = |h| NaiveTime::from_hms_opt(h, 0, 0).unwrap();
        let mut cal = ShiftCalendar::default();
        cal.shifts[1].start = t(13);
        assert_eq!(
            cal.validate(),
            Err(CalendarError::Overlap("early".into(), "late".into()))
        );
        let mut cal = ShiftCalendar::default();
        cal.shifts[0].breaks[0].start = t(15);
        assert!(matches!(
            cal.validate(),
            Err(CalendarError::BreakOutside { .. })
        ));
        let mut cal = ShiftCalendar::default();
        cal.shifts[1].name = "early".into();
        assert_eq!(
            cal.validate(),
            Err(CalendarError::DuplicateName("early".into()))
        );
    }

    #[test]
    fn around_the_clock_is_always_production() {
        let cal = ShiftCalendar::around_the_clock();
        cal.validate().unwrap();
        let s = cal.slot_at(ts("2026-01-05T13:17:00Z"));
        assert!(s.is_production());
        assert_eq!(s.until_ms, ts("2026-01-06T00:00:00Z"));
    }
}
