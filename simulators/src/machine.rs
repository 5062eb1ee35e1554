//! One simulated machine: a state machine in simulated time that yields its events in order and
//! keeps the true tally of what it did.
//!
//! The machine advances one *segment* at a time: a production cycle, a breakdown, a changeover,
//! an idle period or a planned stop. No segment crosses a calendar boundary (shift start or end,
//! break start or end) or the end of the run, so every segment's time belongs to exactly one
//! shift. A cycle cut by a boundary is abandoned: its time counts as run time without a part, a
//! performance loss, as on a real line.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use millrace_shared::{
    Event, EventBody, MachineSpec, MachineState, OperatorAction, OperatorEvent, PartOutcome,
    PartProduced, Reading, ShiftCalendar, ShiftInstance, StateChange, StopReason, Tally, Telemetry,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, LogNormal, Normal};

use crate::config::MachineProfile;

/// How long before a breakdown its signs show in temperature and vibration.
const PRECURSOR_MS: f64 = 30.0 * 60_000.0;

/// The true tally of one machine in one shift instance.
#[derive(Debug, Clone)]
pub struct ShiftTally {
    /// The shift instance.
    pub shift: ShiftInstance,
    /// What happened in it.
    pub tally: Tally,
}

/// What every machine of one run shares.
#[derive(Debug, Clone)]
pub struct RunPlan {
    /// Behaviour of the machines.
    pub profile: MachineProfile,
    /// The shifts.
    pub calendar: Arc<ShiftCalendar>,
    /// Milliseconds between telemetry readings.
    pub telemetry_interval_ms: u64,
    /// The run's seed.
    pub seed: u64,
    /// Start of the simulated period, Unix ms.
    pub start_ms: i64,
    /// End of the simulated period (exclusive), Unix ms.
    pub end_ms: i64,
}

/// One simulated machine.
#[derive(Debug)]
pub struct MachineSim {
    spec: MachineSpec,
    profile: MachineProfile,
    calendar: Arc<ShiftCalendar>,
    telemetry_interval_ms: i64,
    rng: ChaCha8Rng,
    now: i64,
    end: i64,
    state: Option<(MachineState, Option<StopReason>)>,
    state_until: i64,
    run_to_failure_ms: f64,
    parts_since_changeover: u32,
    parts_made: u64,
    next_tick: i64,
    seq: u64,
    out: VecDeque<Event>,
    operator: Option<(String, String)>,
    temperature: f64,
    drift: f64,
    /// True tallies per shift id (`date/name`), in time order of their first segment.
    shifts: BTreeMap<i64, ShiftTally>,
    /// Time outside every shift (planned stop, reason `no_shift`).
    off_shift_ms: u64,
}

impl MachineSim {
    /// A machine that will simulate the plan's period with its own random stream.
    pub fn new(spec: MachineSpec, plan: &RunPlan, stream: u64) -> Self {
        let (start_ms, end_ms) = (plan.start_ms, plan.end_ms);
        let mut rng = ChaCha8Rng::seed_from_u64(plan.seed);
        rng.set_stream(stream);
        let mut m = Self {
            spec,
            profile: plan.profile.clone(),
            calendar: plan.calendar.clone(),
            telemetry_interval_ms: plan.telemetry_interval_ms as i64,
            rng,
            now: start_ms,
            end: end_ms,
            state: None,
            state_until: start_ms,
            run_to_failure_ms: 0.0,
            parts_since_changeover: 0,
            parts_made: 0,
            next_tick: start_ms,
            seq: 0,
            out: VecDeque::new(),
            operator: None,
            temperature: 24.0,
            drift: 0.0,
            shifts: BTreeMap::new(),
            off_shift_ms: 0,
        };
        m.run_to_failure_ms = m.draw_time_to_failure();
        // Start part-way through a batch so that lines do not change over in lockstep.
        m.parts_since_changeover = m.rng.random_range(0..m.profile.batch_size);
        m
    }

    /// The machine's master data.
    pub fn spec(&self) -> &MachineSpec {
        &self.spec
    }

    /// The next event, or `None` when the run is over.
    pub fn next_event(&mut self) -> Option<Event> {
        while self.out.is_empty() && self.now < self.end {
            self.advance();
        }
        self.out.pop_front()
    }

    /// The timestamp of the next event without taking it.
    pub fn peek_ts(&mut self) -> Option<i64> {
        while self.out.is_empty() && self.now < self.end {
            self.advance();
        }
        self.out.front().map(|e| e.ts_ms)
    }

    /// The true tallies per shift, in time order. Complete once [`Self::next_event`] returned `None`.
    pub fn shift_tallies(&self) -> impl Iterator<Item = &ShiftTally> {
        self.shifts.values()
    }

    /// Time spent outside every shift.
    pub fn off_shift_ms(&self) -> u64 {
        self.off_shift_ms
    }

    /// The last sequence number used.
    pub fn last_seq(&self) -> u64 {
        self.seq
    }

    fn draw_time_to_failure(&mut self) -> f64 {
        Exp::new(1.0 / (self.profile.mtbf_minutes * 60_000.0))
            .expect("mtbf validated")
            .sample(&mut self.rng)
    }

    fn draw_exp_minutes(&mut self, mean_minutes: f64) -> i64 {
        let d = Exp::new(1.0 / (mean_minutes * 60_000.0))
            .expect("validated")
            .sample(&mut self.rng);
        (d as i64).max(1_000)
    }

    fn draw_cycle_ms(&mut self) -> i64 {
        let mean = f64::from(self.spec.ideal_cycle_time_ms) * (1.0 + self.profile.speed_loss);
        let sd = mean * self.profile.cycle_jitter;
        let c = Normal::new(mean, sd.max(f64::MIN_POSITIVE))
            .expect("validated")
            .sample(&mut self.rng);
        // A machine cannot beat its ideal cycle time by much.
        c.max(f64::from(self.spec.ideal_cycle_time_ms) * 0.9)
            .round() as i64
    }

    fn push(&mut self, ts_ms: i64, body: EventBody) {
        self.seq += 1;
        self.out.push_back(Event {
            machine: self.spec.id.clone(),
            ts_ms,
            seq: self.seq,
            body,
        });
    }

    fn tally_for(&mut self, shift: &ShiftInstance) -> &mut Tally {
        &mut self
            .shifts
            .entry(shift.start_ms)
            .or_insert_with(|| ShiftTally {
                shift: shift.clone(),
                tally: Tally::default(),
            })
            .tally
    }

    fn set_state(
        &mut self,
        state: MachineState,
        reason: Option<StopReason>,
        shift: Option<&ShiftInstance>,
    ) {
        if self.state == Some((state, reason)) {
            return;
        }
        self.state = Some((state, reason));
        self.push(self.now, EventBody::State(StateChange { state, reason }));
        if let (MachineState::Down, Some(StopReason::TechnicalFailure), Some(shift)) =
            (state, reason, shift)
        {
            self.tally_for(shift).add_failure();
        }
    }

    /// Advances to `to`: telemetry ticks on the way, time accounted to the current state.
    fn span(&mut self, to: i64, shift: Option<&ShiftInstance>) {
        let (state, reason) = self.state.expect("state set before time passes");
        while self.next_tick < to {
            let t = self.next_tick;
            let readings = self.telemetry(state, t);
            self.push(t, EventBody::Telemetry(Telemetry { readings }));
            self.next_tick += self.telemetry_interval_ms;
        }
        let ms = (to - self.now) as u64;
        if state == MachineState::Running {
            self.run_to_failure_ms -= ms as f64;
        }
        match shift {
            Some(shift) => self.tally_for(shift).add_time(state, reason, ms),
            None => self.off_shift_ms += ms,
        }
        self.now = to;
    }

    fn telemetry(&mut self, state: MachineState, t: i64) -> Vec<Reading> {
        let running = state == MachineState::Running;
        // Signs of a coming breakdown: 0 far from it, rising to 1 at the failure.
        let elapsed_in_segment = (t - self.now) as f64;
        let to_failure = self.run_to_failure_ms - elapsed_in_segment;
        let precursor = if running && to_failure < PRECURSOR_MS {
            (1.0 - to_failure / PRECURSOR_MS).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let target = match state {
            MachineState::Running => 62.0,
            MachineState::Idle | MachineState::Changeover => 40.0,
            MachineState::Down | MachineState::PlannedStop => 24.0,
        };
        let dt = self.telemetry_interval_ms as f64;
        let approach = 1.0 - (-dt / (10.0 * 60_000.0)).exp();
        self.temperature += (target - self.temperature) * approach;
        self.drift = (self.drift + self.rng.random_range(-0.05..0.05)).clamp(-2.0, 2.0);
        let noise =
            |rng: &mut ChaCha8Rng, sd: f64| Normal::new(0.0, sd).expect("sd > 0").sample(rng);
        let temperature =
            self.temperature + self.drift + 15.0 * precursor + noise(&mut self.rng, 0.3);
        let (vibration, load, power) = if running {
            (
                2.0 + 3.0 * precursor + noise(&mut self.rng, 0.2),
                (55.0 + 10.0 * precursor + noise(&mut self.rng, 4.0)).clamp(0.0, 100.0),
                11.0 + 2.0 * precursor + noise(&mut self.rng, 0.4),
            )
        } else {
            let standby = if state == MachineState::PlannedStop || state == MachineState::Down {
                0.3
            } else {
                2.5
            };
            (
                0.1 + noise(&mut self.rng, 0.02).abs(),
                0.0,
                standby + noise(&mut self.rng, 0.05).abs(),
            )
        };
        let r = |name: &str, v: f64, unit: &str| Reading {
            name: name.into(),
            value: (v * 100.0).round() / 100.0,
            unit: unit.into(),
        };
        vec![
            r("temperature", temperature, "degC"),
            r("vibration", vibration.max(0.0), "mm/s"),
            r("spindle_load", load, "%"),
            r("power", power.max(0.0), "kW"),
        ]
    }

    fn operator_for(&mut self, shift: &ShiftInstance) {
        let shift_id = shift.id();
        if self.operator.as_ref().is_some_and(|(s, _)| *s == shift_id) {
            return;
        }
        self.logout();
        let operator = format!("op-{:02}", self.rng.random_range(1..=40));
        self.push(
            self.now,
            EventBody::Operator(OperatorEvent {
                action: OperatorAction::Login,
                operator: operator.clone(),
            }),
        );
        self.operator = Some((shift_id, operator));
    }

    fn logout(&mut self) {
        if let Some((_, operator)) = self.operator.take() {
            self.push(
                self.now,
                EventBody::Operator(OperatorEvent {
                    action: OperatorAction::Logout,
                    operator,
                }),
            );
        }
    }

    fn advance(&mut self) {
        let slot = self.calendar.slot_at(self.now);
        let limit = slot.until_ms.min(self.end);
        let shift = slot.shift.as_ref();
        let Some(shift) = shift.filter(|_| slot.is_production()) else {
            if shift.is_none() {
                self.logout();
            }
            let reason = if shift.is_some() {
                StopReason::Break
            } else {
                StopReason::NoShift
            };
            self.set_state(MachineState::PlannedStop, Some(reason), shift);
            self.span(limit, shift);
            return;
        };
        self.operator_for(shift);
        match self.state.map(|(s, _)| s) {
            None | Some(MachineState::PlannedStop) => {
                self.set_state(MachineState::Running, None, Some(shift))
            }
            Some(MachineState::Running) => self.run_cycle(limit, shift),
            Some(_) => {
                self.span(self.state_until.min(limit), Some(shift));
                if self.now >= self.state_until {
                    self.set_state(MachineState::Running, None, Some(shift));
                }
            }
        }
    }

    fn run_cycle(&mut self, limit: i64, shift: &ShiftInstance) {
        let cycle = self.draw_cycle_ms();
        let cycle_end = self.now + cycle;
        let fail_at = self.now + self.run_to_failure_ms.max(0.0).ceil() as i64;
        if fail_at < cycle_end && fail_at <= limit {
            self.span(fail_at, Some(shift));
            let repair = LogNormal::from_mean_cv(self.profile.mttr_minutes * 60_000.0, 0.5)
                .expect("validated")
                .sample(&mut self.rng)
                .max(30_000.0);
            self.state_until = self.now + repair as i64;
            self.run_to_failure_ms = self.draw_time_to_failure();
            self.set_state(
                MachineState::Down,
                Some(StopReason::TechnicalFailure),
                Some(shift),
            );
            return;
        }
        if cycle_end >= limit {
            // A break, the shift's end or the run's end comes first: the cycle is abandoned. (A
            // part finished exactly at the shift's end would belong to the next period, as
            // periods are half-open [start, end) in the reports.)
            self.span(limit, Some(shift));
            return;
        }
        self.span(cycle_end, Some(shift));
        let draw: f64 = self.rng.random();
        let outcome = if draw < self.profile.scrap_rate {
            PartOutcome::Scrap
        } else if draw < self.profile.scrap_rate + self.profile.rework_rate {
            PartOutcome::Rework
        } else {
            PartOutcome::Good
        };
        self.parts_made += 1;
        let part_id = Some(format!("{}-{:07}", self.spec.id.machine, self.parts_made));
        self.push(
            self.now,
            EventBody::Part(PartProduced {
                outcome,
                cycle_time_ms: cycle as u32,
                part_id,
            }),
        );
        let ideal = u64::from(self.spec.ideal_cycle_time_ms);
        self.tally_for(shift).add_part(outcome, ideal);
        self.parts_since_changeover += 1;

        let hours = cycle as f64 / 3_600_000.0;
        let p = &self.profile;
        let (minor_p, idle_p) = (p.minor_stops_per_hour * hours, p.idle_per_hour * hours);
        let (minor_minutes, idle_minutes, changeover_minutes) =
            (p.minor_stop_minutes, p.idle_minutes, p.changeover_minutes);
        if self.parts_since_changeover >= self.profile.batch_size {
            self.parts_since_changeover = 0;
            let d = Normal::new(changeover_minutes, changeover_minutes * 0.2)
                .expect("validated")
                .sample(&mut self.rng);
            self.state_until = self.now + (d.max(1.0) * 60_000.0) as i64;
            self.set_state(
                MachineState::Changeover,
                Some(StopReason::Tooling),
                Some(shift),
            );
        } else if self.rng.random::<f64>() < minor_p {
            let reason = [
                StopReason::MaterialShortage,
                StopReason::OperatorAbsence,
                StopReason::QualityCheck,
            ][self.rng.random_range(0..3)];
            self.state_until = self.now + self.draw_exp_minutes(minor_minutes);
            self.set_state(MachineState::Down, Some(reason), Some(shift));
        } else if self.rng.random::<f64>() < idle_p {
            self.state_until = self.now + self.draw_exp_minutes(idle_minutes);
            self.set_state(MachineState::Idle, Some(StopReason::NoOrder), Some(shift));
        }
    }
}
