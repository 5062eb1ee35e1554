//! The simulated factory's layout and machine behaviour, from flags or a TOML file.

use std::path::Path;

use millrace_shared::{MachineId, MachineSpec, ShiftCalendar};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Why a factory description was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read factory file {path}: {source}")]
    Read {
        /// The path given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for a factory.
    #[error("factory file {path} is not valid: {source}")]
    Parse {
        /// The path given.
        path: String,
        /// What the TOML parser said.
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("factory setting `{field}` = {value} is out of range: expected {expected}")]
    Range {
        /// The setting.
        field: &'static str,
        /// Its value.
        value: String,
        /// The accepted range.
        expected: &'static str,
    },
    /// The shift calendar is inconsistent.
    #[error("shift calendar: {0}")]
    Calendar(#[from] millrace_shared::CalendarError),
    /// A machine identifier is invalid.
    #[error("machine: {0}")]
    Machine(#[from] millrace_shared::TopicError),
}

/// How machines behave; every machine draws from these distributions with its own random stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MachineProfile {
    /// Mean actual cycle time is ideal × (1 + speed_loss).
    pub speed_loss: f64,
    /// Standard deviation of a cycle's time, as a fraction of the mean.
    pub cycle_jitter: f64,
    /// Probability that a part is scrap.
    pub scrap_rate: f64,
    /// Probability that a part needs rework.
    pub rework_rate: f64,
    /// Mean run time between breakdowns, minutes (exponential).
    pub mtbf_minutes: f64,
    /// Mean repair time, minutes (log-normal, σ = 0.5).
    pub mttr_minutes: f64,
    /// Minor stops (material shortage, operator absence, quality check) per hour of run time.
    pub minor_stops_per_hour: f64,
    /// Mean minor stop length, minutes (exponential).
    pub minor_stop_minutes: f64,
    /// Idle periods (waiting for an order) per hour of run time.
    pub idle_per_hour: f64,
    /// Mean idle period, minutes (exponential).
    pub idle_minutes: f64,
    /// Parts per batch; a changeover follows each batch.
    pub batch_size: u32,
    /// Mean changeover length, minutes (normal, σ = 20%).
    pub changeover_minutes: f64,
}

impl Default for MachineProfile {
    fn default() -> Self {
        Self {
            speed_loss: 0.08,
            cycle_jitter: 0.05,
            scrap_rate: 0.02,
            rework_rate: 0.01,
            mtbf_minutes: 240.0,
            mttr_minutes: 20.0,
            minor_stops_per_hour: 0.5,
            minor_stop_minutes: 4.0,
            idle_per_hour: 0.2,
            idle_minutes: 6.0,
            batch_size: 400,
            changeover_minutes: 15.0,
        }
    }
}

/// A whole simulated factory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FactoryConfig {
    /// Number of sites, when machines are not listed one by one.
    pub sites: u32,
    /// Lines per site.
    pub lines_per_site: u32,
    /// Machines per line.
    pub machines_per_line: u32,
    /// Explicit machines; when given, `sites`, `lines_per_site` and `machines_per_line` are unused.
    pub machines: Vec<MachineSpec>,
    /// Behaviour of every machine.
    pub profile: MachineProfile,
    /// Milliseconds between two telemetry readings of a machine.
    pub telemetry_interval_ms: u64,
    /// The daily shifts (UTC).
    pub calendar: ShiftCalendar,
}

impl Default for FactoryConfig {
    fn default() -> Self {
        Self {
            sites: 1,
            lines_per_site: 3,
            machines_per_line: 4,
            machines: vec![],
            profile: MachineProfile::default(),
            telemetry_interval_ms: 10_000,
            calendar: ShiftCalendar::default(),
        }
    }
}

/// Ideal cycle times (seconds) of the products that generated lines make, one per line in turn.
const LINE_CYCLE_SECONDS: [u32; 5] = [30, 45, 20, 60, 36];

impl FactoryConfig {
    /// Reads a TOML factory file; fields left out keep their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Checks ranges and returns the machines, generated from the counts when not listed.
    /// Generated machines get their line's ideal cycle time with a small per-machine spread
    /// drawn from `seed`.
    pub fn machines(&self, seed: u64) -> Result<Vec<MachineSpec>, ConfigError> {
        self.validate()?;
        if !self.machines.is_empty() {
            for m in &self.machines {
                m.id.validate()?;
            }
            return Ok(self.machines.clone());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(u64::MAX);
        let mut out = vec![];
        for s in 1..=self.sites {
            for l in 1..=self.lines_per_site {
                let base = LINE_CYCLE_SECONDS[((l - 1) as usize) % LINE_CYCLE_SECONDS.len()] * 1000;
                for m in 1..=self.machines_per_line {
                    let spread = rng.random_range(0.9..1.1);
                    out.push(MachineSpec {
                        id: MachineId::new(
                            format!("plant-{s}"),
                            format!("line-{l}"),
                            format!("machine-{m:02}"),
                        )?,
                        ideal_cycle_time_ms: (f64::from(base) * spread).round() as u32,
                    });
                }
            }
        }
        Ok(out)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        fn range(
            field: &'static str,
            v: f64,
            lo: f64,
            hi: f64,
            expected: &'static str,
        ) -> Result<(), ConfigError> {
            if v.is_finite() && (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::Range {
                    field,
                    value: v.to_string(),
                    expected,
                })
            }
        }
        let p = &self.profile;
        range("profile.speed_loss", p.speed_loss, 0.0, 5.0, "0 to 5")?;
        range("profile.cycle_jitter", p.cycle_jitter, 0.0, 0.5, "0 to 0.5")?;
        range(
            "profile.scrap_rate",
            p.scrap_rate,
            0.0,
            1.0,
            "a probability from 0 to 1",
        )?;
        range(
            "profile.rework_rate",
            p.rework_rate,
            0.0,
            1.0 - p.scrap_rate,
            "a probability from 0 to 1 − scrap_rate",
        )?;
        range(
            "profile.mtbf_minutes",
            p.mtbf_minutes,
            1.0,
            1e7,
            "1 to 10,000,000 minutes",
        )?;
        range(
            "profile.mttr_minutes",
            p.mttr_minutes,
            0.1,
            1e5,
            "0.1 to 100,000 minutes",
        )?;
        range(
            "profile.minor_stops_per_hour",
            p.minor_stops_per_hour,
            0.0,
            60.0,
            "0 to 60",
        )?;
        range(
            "profile.minor_stop_minutes",
            p.minor_stop_minutes,
            0.1,
            1e4,
            "0.1 to 10,000 minutes",
        )?;
        range(
            "profile.idle_per_hour",
            p.idle_per_hour,
            0.0,
            60.0,
            "0 to 60",
        )?;
        range(
            "profile.idle_minutes",
            p.idle_minutes,
            0.1,
            1e4,
            "0.1 to 10,000 minutes",
        )?;
        range(
            "profile.changeover_minutes",
            p.changeover_minutes,
            0.1,
            1e4,
            "0.1 to 10,000 minutes",
        )?;
        range(
            "profile.batch_size",
            f64::from(p.batch_size),
            1.0,
            1e9,
            "at least 1",
        )?;
        range(
            "telemetry_interval_ms",
            self.telemetry_interval_ms as f64,
            10.0,
            86_400_000.0,
            "10 ms to one day",
        )?;
        if self.machines.is_empty() {
            let n = u64::from(self.sites)
                * u64::from(self.lines_per_site)
                * u64::from(self.machines_per_line);
            range(
                "sites × lines_per_site × machines_per_line",
                n as f64,
                1.0,
                100_000.0,
                "1 to 100,000 machines",
            )?;
        }
        for m in &self.machines {
            range(
                "machines.ideal_cycle_time_ms",
                f64::from(m.ideal_cycle_time_ms),
                100.0,
                86_400_000.0,
                "100 ms to one day",
            )?;
        }
        self.calendar.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_make_twelve_machines_deterministically() {
        let c = FactoryConfig::default();
        let a = c.machines(7).unwrap();
        assert_eq!(a.len(), 12);
        assert_eq!(a[0].id.to_string(), "plant-1/line-1/machine-01");
        assert_eq!(a, c.machines(7).unwrap());
        assert_ne!(a, c.machines(8).unwrap());
        assert!(
            a.iter()
                .all(|m| (18_000..=66_000).contains(&m.ideal_cycle_time_ms))
        );
    }

    #[test]
    fn toml_files_override_defaults_and_bad_values_are_named() {
        let c: FactoryConfig = toml::from_str(
            r#"
            telemetry_interval_ms = 1000
            [profile]
            scrap_rate = 0.05
            [[machines]]
            site = "s"
            line = "l"
            machine = "m"
            ideal_cycle_time_ms = 12000
            [calendar]
            shifts = [{ name = "day", start = "08:00:00", end = "16:00:00" }]
            "#,
        )
        .unwrap();
        assert_eq!(c.machines(1).unwrap().len(), 1);
        assert_eq!(c.profile.scrap_rate, 0.05);
        assert_eq!(c.profile.mtbf_minutes, 240.0);

        let mut bad = c.clone();
        bad.profile.scrap_rate = 1.5;
        let e = bad.machines(1).unwrap_err().to_string();
        assert_eq!(
            e,
            "factory setting `profile.scrap_rate` = 1.5 is out of range: expected a probability from 0 to 1"
        );
        let e = toml::from_str::<FactoryConfig>("[profile]\nscrap = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `scrap`"), "{e}");
    }
}
