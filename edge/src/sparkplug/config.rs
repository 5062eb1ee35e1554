//! What the Sparkplug host is told: its id, and which Sparkplug group/node/device is which
//! machine of the factory, with the metrics that carry its state and its part counts.

use std::collections::BTreeMap;
use std::time::Duration;

use millrace_shared::{MachineId, MachineState, StopReason};
use serde::{Deserialize, Serialize};

/// The Sparkplug B host application.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SparkplugConfig {
    /// Decode `spBv1.0/…` messages into the factory model and act as a Sparkplug host. Off:
    /// they are not ingested (a dead letter each would be noise) and no `STATE` is published.
    pub enabled: bool,
    /// This host's id: its `STATE` topic is `spBv1.0/STATE/{host_id}`.
    pub host_id: String,
    /// At most one rebirth request per node in this time: a node that keeps sending data the
    /// host cannot read is not flooded with commands.
    #[serde(with = "humantime_serde")]
    pub rebirth_interval: Duration,
    /// Which group/node/device is which machine. Devices not listed are stored as telemetry
    /// of the machine `{group}/{node}/{device}` (node metrics: machine `node`).
    pub machines: Vec<MachineMapping>,
}

impl Default for SparkplugConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            host_id: "millrace".into(),
            rebirth_interval: Duration::from_secs(5),
            machines: vec![],
        }
    }
}

/// One Sparkplug device (or a node's own metrics) as one machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineMapping {
    /// The Sparkplug group id.
    pub group: String,
    /// The edge node id.
    pub node: String,
    /// The device id; absent: the node's own metrics.
    #[serde(default)]
    pub device: Option<String>,
    /// The machine, `site/line/machine`.
    pub machine: String,
    /// The metrics stored as this machine's telemetry. Absent: every numeric or boolean
    /// metric not used below. Metrics not listed are stored under the Sparkplug names.
    #[serde(default)]
    pub telemetry: Option<Vec<String>>,
    /// The metric that holds the machine's state.
    #[serde(default)]
    pub state: Option<StateMapping>,
    /// A counter of good parts (cumulative; a value lower than the last one is a reset).
    #[serde(default)]
    pub good_parts: Option<String>,
    /// A counter of scrapped parts (cumulative, as `good_parts`).
    #[serde(default)]
    pub scrap_parts: Option<String>,
}

/// A metric whose values name the machine's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateMapping {
    /// The metric's name.
    pub metric: String,
    /// Each value (as text: `1`, `true`, `RUN`) and the state it means: `running`, `idle`,
    /// `planned_stop`, `changeover` or `down`, with a reason after a colon
    /// (`down:technical_failure`).
    pub values: BTreeMap<String, String>,
}

/// Why the Sparkplug configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("sparkplug.{field}: {reason}")]
pub struct SparkplugConfigError {
    /// The field.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

/// A state value's meaning.
pub(crate) type StateMeaning = (MachineState, Option<StopReason>);

/// Parses `running` or `down:technical_failure`.
pub(crate) fn parse_state(text: &str) -> Result<StateMeaning, String> {
    let (state, reason) = match text.split_once(':') {
        Some((s, r)) => (s, Some(r)),
        None => (text, None),
    };
    let state = MachineState::ALL
        .into_iter()
        .find(|s| s.as_str() == state)
        .ok_or_else(|| {
            format!("`{state}` is not a state (running, idle, planned_stop, changeover, down)")
        })?;
    let reason = match reason {
        None => None,
        Some(r) => Some(
            serde_json::from_value::<StopReason>(serde_json::Value::String(r.to_owned()))
                .map_err(|_| format!("`{r}` is not a stop reason"))?,
        ),
    };
    if state == MachineState::Running && reason.is_some() {
        return Err("`running` takes no reason".into());
    }
    Ok((state, reason))
}

/// Sparkplug forbids these in group, node, device and host ids.
fn valid_sparkplug_id(id: &str) -> bool {
    !id.is_empty() && !id.contains(['/', '+', '#'])
}

impl SparkplugConfig {
    /// Checks ids, machines and state values.
    pub fn validate(&self) -> Result<(), SparkplugConfigError> {
        let err = |field: String, reason: String| Err(SparkplugConfigError { field, reason });
        if !valid_sparkplug_id(&self.host_id) {
            return err(
                "host_id".into(),
                "must be non-empty without `/`, `+` or `#`".into(),
            );
        }
        if self.rebirth_interval < Duration::from_millis(100) {
            return err("rebirth_interval".into(), "must be at least 100ms".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, m) in self.machines.iter().enumerate() {
            let at = |f: &str| format!("machines[{i}].{f}");
            for (f, id) in [("group", &m.group), ("node", &m.node)]
                .into_iter()
                .chain(m.device.as_ref().map(|d| ("device", d)))
            {
                if !valid_sparkplug_id(id) {
                    return err(at(f), "must be non-empty without `/`, `+` or `#`".into());
                }
            }
            if !seen.insert((&m.group, &m.node, &m.device)) {
                return err(
                    at("device"),
                    "this group/node/device is mapped twice".into(),
                );
            }
            machine_id(&m.machine).map_err(|reason| SparkplugConfigError {
                field: at("machine"),
                reason,
            })?;
            if let Some(s) = &m.state {
                if s.values.is_empty() {
                    return err(at("state.values"), "name at least one value".into());
                }
                for (v, meaning) in &s.values {
                    parse_state(meaning).map_err(|reason| SparkplugConfigError {
                        field: at(&format!("state.values.{v}")),
                        reason,
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// Parses `site/line/machine`.
pub(crate) fn machine_id(text: &str) -> Result<MachineId, String> {
    let parts: Vec<&str> = text.split('/').collect();
    let [site, line, machine] = parts[..] else {
        return Err(format!("`{text}` is not site/line/machine"));
    };
    MachineId::new(site, line, machine).map_err(|e| e.to_string())
}
