//! ISO 22400 time accounting and OEE arithmetic.
//!
//! A [`Tally`] holds raw sums (times and counts) for one machine over one period. Tallies add up:
//! a line's tally is the sum of its machines', a day's the sum of its shifts'. Ratios are derived
//! from the sums only at the end ([`Kpis::from_tally`]), so roll-ups never average ratios.
//!
//! - planned production time = all time − planned-stop time
//! - availability = run time / planned production time
//! - performance = Σ(ideal cycle time × parts) / run time
//! - quality = good parts / all parts (rework is not good the first time)
//! - OEE = availability × performance × quality
//! - MTBF = run time / technical failures; MTTR = technical-failure down time / technical failures

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::{MachineState, PartOutcome, StopReason};

/// Milliseconds spent in each machine state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateTimes {
    /// Time producing.
    pub running_ms: u64,
    /// Time ready but not producing.
    pub idle_ms: u64,
    /// Time not planned to produce.
    pub planned_stop_ms: u64,
    /// Time in changeover.
    pub changeover_ms: u64,
    /// Time stopped unplanned.
    pub down_ms: u64,
}

impl StateTimes {
    /// Adds `ms` to `state`.
    pub fn add(&mut self, state: MachineState, ms: u64) {
        *match state {
            MachineState::Running => &mut self.running_ms,
            MachineState::Idle => &mut self.idle_ms,
            MachineState::PlannedStop => &mut self.planned_stop_ms,
            MachineState::Changeover => &mut self.changeover_ms,
            MachineState::Down => &mut self.down_ms,
        } += ms;
    }

    /// All time accounted for.
    pub const fn total_ms(&self) -> u64 {
        self.running_ms + self.idle_ms + self.planned_stop_ms + self.changeover_ms + self.down_ms
    }

    /// Planned production time: everything but planned stops.
    pub const fn planned_production_ms(&self) -> u64 {
        self.total_ms() - self.planned_stop_ms
    }

    fn merge(&mut self, o: &StateTimes) {
        self.running_ms += o.running_ms;
        self.idle_ms += o.idle_ms;
        self.planned_stop_ms += o.planned_stop_ms;
        self.changeover_ms += o.changeover_ms;
        self.down_ms += o.down_ms;
    }
}

/// Raw, additive sums for one machine (or a roll-up) over one period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Good parts.
    pub good: u64,
    /// Scrapped parts.
    pub scrap: u64,
    /// Parts sent to rework.
    pub rework: u64,
    /// Time per state.
    pub times: StateTimes,
    /// Σ ideal cycle time × parts, in ms: the time the parts would have taken at ideal speed.
    pub ideal_output_ms: u64,
    /// Entries into `down` with reason `technical_failure`.
    pub failures: u64,
    /// Time down with reason `technical_failure`.
    pub failure_down_ms: u64,
    /// Unplanned stop time (down, idle, changeover) by reason; `unspecified` when none was given.
    pub stop_time_by_reason: BTreeMap<String, u64>,
}

impl Tally {
    /// Counts one part made on a machine with the given ideal cycle time.
    pub fn add_part(&mut self, outcome: PartOutcome, ideal_cycle_time_ms: u64) {
        match outcome {
            PartOutcome::Good => self.good += 1,
            PartOutcome::Scrap => self.scrap += 1,
            PartOutcome::Rework => self.rework += 1,
        }
        self.ideal_output_ms += ideal_cycle_time_ms;
    }

    /// Counts `ms` spent in `state` for `reason`.
    pub fn add_time(&mut self, state: MachineState, reason: Option<StopReason>, ms: u64) {
        self.times.add(state, ms);
        if matches!(
            state,
            MachineState::Down | MachineState::Idle | MachineState::Changeover
        ) && ms > 0
        {
            let key = reason.map_or("unspecified", StopReason::as_str);
            *self.stop_time_by_reason.entry(key.to_owned()).or_default() += ms;
        }
        if state == MachineState::Down && reason == Some(StopReason::TechnicalFailure) {
            self.failure_down_ms += ms;
        }
    }

    /// Counts the start of a breakdown.
    pub fn add_failure(&mut self) {
        self.failures += 1;
    }

    /// All parts.
    pub const fn total(&self) -> u64 {
        self.good + self.scrap + self.rework
    }

    /// Adds another tally into this one.
    pub fn merge(&mut self, o: &Tally) {
        self.good += o.good;
        self.scrap += o.scrap;
        self.rework += o.rework;
        self.times.merge(&o.times);
        self.ideal_output_ms += o.ideal_output_ms;
        self.failures += o.failures;
        self.failure_down_ms += o.failure_down_ms;
        for (k, v) in &o.stop_time_by_reason {
            *self.stop_time_by_reason.entry(k.clone()).or_default() += v;
        }
    }
}

/// A tally with its derived ratios. Ratios are `None` where their denominator is zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Kpis {
    /// The raw sums.
    #[serde(flatten)]
    pub tally: Tally,
    /// All parts.
    pub total: u64,
    /// Planned production time in ms.
    pub planned_production_ms: u64,
    /// Run time / planned production time.
    pub availability: Option<f64>,
    /// Ideal output time / run time.
    pub performance: Option<f64>,
    /// Good / total.
    pub quality: Option<f64>,
    /// Availability × performance × quality.
    pub oee: Option<f64>,
    /// Mean run time between technical failures, ms.
    pub mtbf_ms: Option<f64>,
    /// Mean technical-failure down time, ms.
    pub mttr_ms: Option<f64>,
    /// Parts per hour of planned production time.
    pub throughput_per_hour: Option<f64>,
}

fn ratio(num: u64, den: u64) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

impl Kpis {
    /// Derives the ratios from raw sums.
    pub fn from_tally(tally: Tally) -> Self {
        let planned = tally.times.planned_production_ms();
        let run = tally.times.running_ms;
        let total = tally.total();
        let availability = ratio(run, planned);
        let performance = ratio(tally.ideal_output_ms, run);
        let quality = ratio(tally.good, total);
        let oee = match (availability, performance, quality) {
            (Some(a), Some(p), Some(q)) => Some(a * p * q),
            // No run time or no parts during planned time: nothing effective was produced.
            _ if planned > 0 => Some(0.0),
            _ => None,
        };
        Self {
            total,
            planned_production_ms: planned,
            availability,
            performance,
            quality,
            oee,
            mtbf_ms: ratio(run, tally.failures),
            mttr_ms: ratio(tally.failure_down_ms, tally.failures),
            throughput_per_hour: ratio(total * 3_600_000, planned),
            tally,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oee_is_the_product_and_rollups_divide_sums() {
        let mut a = Tally::default();
        a.add_time(
            MachineState::PlannedStop,
            Some(StopReason::Break),
            1_800_000,
        );
        a.add_time(MachineState::Running, None, 20_000_000);
        a.add_time(
            MachineState::Down,
            Some(StopReason::TechnicalFailure),
            3_000_000,
        );
        a.add_time(MachineState::Idle, None, 4_000_000);
        a.add_failure();
        for _ in 0..500 {
            a.add_part(PartOutcome::Good, 36_000);
        }
        for _ in 0..20 {
            a.add_part(PartOutcome::Scrap, 36_000);
        }
        let k = Kpis::from_tally(a.clone());
        assert_eq!(k.planned_production_ms, 27_000_000);
        assert!((k.availability.unwrap() - 20.0 / 27.0).abs() < 1e-12);
        assert!((k.performance.unwrap() - 520.0 * 36.0 / 20_000.0).abs() < 1e-12);
        assert!((k.quality.unwrap() - 500.0 / 520.0).abs() < 1e-12);
        let product = k.availability.unwrap() * k.performance.unwrap() * k.quality.unwrap();
        assert!((k.oee.unwrap() - product).abs() < 1e-15);
        assert_eq!(k.mtbf_ms, Some(20_000_000.0));
        assert_eq!(k.mttr_ms, Some(3_000_000.0));
        assert_eq!(k.tally.stop_time_by_reason["technical_failure"], 3_000_000);
        assert_eq!(k.tally.stop_time_by_reason["unspecified"], 4_000_000);

        // A second machine that ran all planned time: the roll-up is not the mean of the OEEs.
        let mut b = Tally::default();
        b.add_time(MachineState::Running, None, 1_000_000);
        for _ in 0..10 {
            b.add_part(PartOutcome::Good, 100_000);
        }
        let kb = Kpis::from_tally(b.clone());
        assert_eq!(kb.oee, Some(1.0));
        let mut line = a;
        line.merge(&b);
        let kl = Kpis::from_tally(line);
        assert_eq!(kl.total, 530);
        assert!((kl.availability.unwrap() - 21.0 / 28.0).abs() < 1e-12);
        let mean_of_oees = (k.oee.unwrap() + 1.0) / 2.0;
        assert!((kl.oee.unwrap() - mean_of_oees).abs() > 0.1);
    }

    #[test]
    fn empty_periods_have_no_ratios() {
        let k = Kpis::from_tally(Tally::default());
        assert_eq!((k.availability, k.oee, k.mtbf_ms), (None, None, None));
        let mut t = Tally::default();
        t.add_time(MachineState::Down, Some(StopReason::MaterialShortage), 1000);
        let k = Kpis::from_tally(t);
        assert_eq!(k.availability, Some(0.0));
        assert_eq!(k.oee, Some(0.0));
    }
}
