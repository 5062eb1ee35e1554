//! The MQTT topic scheme and machine identity.
//!
//! Devices publish to `factory/{site}/{line}/{machine}/{kind}` where `kind` is one of
//! `state`, `part`, `telemetry`, `operator`. Identifiers are 1 to 64 characters of
//! `A-Z a-z 0-9 _ -`, so that they are safe in topics, file paths, Parquet partitions and URLs.

use std::fmt;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::event::EventKind;

/// The first level of every Millrace device topic.
pub const TOPIC_ROOT: &str = "factory";

/// Longest identifier accepted for a site, line or machine.
pub const MAX_ID_LEN: usize = 64;

/// The MQTT subscription filter that matches every device topic.
pub const ALL_DEVICE_TOPICS: &str = "factory/#";

/// Why a topic or identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The topic does not start with `factory/`.
    #[error(
        "topic `{topic}` is not a Millrace device topic: expected `factory/{{site}}/{{line}}/{{machine}}/{{kind}}`"
    )]
    NotFactory {
        /// The topic as received.
        topic: String,
    },
    /// The topic has the wrong number of levels.
    #[error(
        "topic `{topic}` has {levels} levels, expected 5: `factory/{{site}}/{{line}}/{{machine}}/{{kind}}`"
    )]
    Levels {
        /// The topic as received.
        topic: String,
        /// How many `/`-separated levels it has.
        levels: usize,
    },
    /// The last level names no known event kind.
    #[error(
        "topic `{topic}` ends in unknown event kind `{kind}`, expected one of state, part, telemetry, operator"
    )]
    UnknownKind {
        /// The topic as received.
        topic: String,
        /// The unknown last level.
        kind: String,
    },
    /// A machine path is not `site/line/machine`.
    #[error("`{value}` is not a machine path: expected `site/line/machine`")]
    MachinePath {
        /// The text as given.
        value: String,
    },
    /// A series path is not `site/line/machine/metric`.
    #[error("`{value}` is not a series: expected `site/line/machine/metric`")]
    SeriesPath {
        /// The text as given.
        value: String,
    },
    /// An identifier is empty, too long or uses characters outside `A-Z a-z 0-9 _ -`.
    #[error(
        "{what} `{value}` is not a valid identifier: expected 1 to 64 characters of A-Z a-z 0-9 _ -"
    )]
    BadId {
        /// Which identifier (`site`, `line` or `machine`).
        what: &'static str,
        /// The identifier as received.
        value: String,
    },
}

/// Checks one identifier level.
pub fn validate_id(what: &'static str, value: &str) -> Result<(), TopicError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_ID_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(TopicError::BadId {
            what,
            value: value.chars().take(80).collect(),
        })
    }
}

/// Which machine an event comes from: site, line and machine, as in the topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MachineId {
    /// The site (plant), e.g. `plant-1`.
    pub site: CompactString,
    /// The production line within the site, e.g. `line-a`.
    pub line: CompactString,
    /// The machine within the line, e.g. `press-03`.
    pub machine: CompactString,
}

impl MachineId {
    /// Builds an identity after checking each level.
    pub fn new(
        site: impl Into<CompactString>,
        line: impl Into<CompactString>,
        machine: impl Into<CompactString>,
    ) -> Result<Self, TopicError> {
        let id = Self {
            site: site.into(),
            line: line.into(),
            machine: machine.into(),
        };
        id.validate()?;
        Ok(id)
    }

    /// Checks each level of an identity built by hand or decoded from storage.
    pub fn validate(&self) -> Result<(), TopicError> {
        validate_id("site", &self.site)?;
        validate_id("line", &self.line)?;
        validate_id("machine", &self.machine)
    }

    /// The topic a device publishes events of `kind` to.
    pub fn topic(&self, kind: EventKind) -> String {
        format!(
            "{TOPIC_ROOT}/{}/{}/{}/{}",
            self.site,
            self.line,
            self.machine,
            kind.as_str()
        )
    }

    /// Parses a device topic into the machine and the event kind.
    pub fn parse_topic(topic: &str) -> Result<(Self, EventKind), TopicError> {
        let mut levels = topic.split('/');
        if levels.next() != Some(TOPIC_ROOT) {
            return Err(TopicError::NotFactory {
                topic: truncate(topic),
            });
        }
        let rest: Vec<&str> = levels.collect();
        if rest.len() != 4 {
            return Err(TopicError::Levels {
                topic: truncate(topic),
                levels: rest.len() + 1,
            });
        }
        let kind = EventKind::parse(rest[3]).ok_or_else(|| TopicError::UnknownKind {
            topic: truncate(topic),
            kind: truncate(rest[3]),
        })?;
        Ok((Self::new(rest[0], rest[1], rest[2])?, kind))
    }
}

impl fmt::Display for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.site, self.line, self.machine)
    }
}

/// Parses `site/line/machine` (as [`MachineId`]'s `Display` writes it), checking each level.
impl std::str::FromStr for MachineId {
    type Err = TopicError;

    fn from_str(s: &str) -> Result<Self, TopicError> {
        let mut levels = s.split('/');
        match (levels.next(), levels.next(), levels.next(), levels.next()) {
            (Some(site), Some(line), Some(machine), None) => Self::new(site, line, machine),
            _ => Err(TopicError::MachinePath { value: truncate(s) }),
        }
    }
}

/// One telemetry series: a machine's metric, written `site/line/machine/metric`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SeriesKey {
    /// The machine.
    pub machine: MachineId,
    /// The metric's name (an identifier, like the levels of the machine).
    pub metric: CompactString,
}

impl SeriesKey {
    /// Builds a key after checking the metric's name.
    pub fn new(machine: MachineId, metric: impl Into<CompactString>) -> Result<Self, TopicError> {
        let metric = metric.into();
        validate_id("metric", &metric)?;
        Ok(Self { machine, metric })
    }

    /// Appends `site/line/machine/metric` to `out` (no allocation when `out` has room: the
    /// store names a series per reading).
    pub fn write_path(machine: &MachineId, metric: &str, out: &mut String) {
        for level in [&*machine.site, &*machine.line, &*machine.machine] {
            out.push_str(level);
            out.push('/');
        }
        out.push_str(metric);
    }
}

impl fmt::Display for SeriesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.machine, self.metric)
    }
}

/// Parses `site/line/machine/metric`, checking each level.
impl std::str::FromStr for SeriesKey {
    type Err = TopicError;

    fn from_str(s: &str) -> Result<Self, TopicError> {
        match s.rsplit_once('/') {
            Some((machine, metric)) if machine.contains('/') => Self::new(machine.parse()?, metric),
            _ => Err(TopicError::SeriesPath { value: truncate(s) }),
        }
    }
}

/// Keeps error messages bounded when a device sends something huge.
fn truncate(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        s.to_owned()
    } else {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_paths_round_trip_and_bad_ones_say_why() {
        let id: MachineId = "plant-1/line_a/press-03".parse().unwrap();
        assert_eq!(id, MachineId::new("plant-1", "line_a", "press-03").unwrap());
        assert_eq!(id.to_string().parse::<MachineId>().unwrap(), id);
        for bad in ["press-03", "a/b", "a/b/c/d", ""] {
            let e = bad.parse::<MachineId>().unwrap_err();
            assert!(matches!(e, TopicError::MachinePath { .. }), "{bad}: {e}");
        }
        let e = "a/b c/d".parse::<MachineId>().unwrap_err();
        assert!(matches!(e, TopicError::BadId { what: "line", .. }), "{e}");
    }

    #[test]
    fn series_paths_round_trip_and_bad_ones_say_why() {
        let k: SeriesKey = "plant-1/line_a/press-03/temp".parse().unwrap();
        assert_eq!(
            k.machine,
            MachineId::new("plant-1", "line_a", "press-03").unwrap()
        );
        assert_eq!(k.metric, "temp");
        assert_eq!(k.to_string(), "plant-1/line_a/press-03/temp");
        let mut path = String::from("t/");
        SeriesKey::write_path(&k.machine, &k.metric, &mut path);
        assert_eq!(path, "t/plant-1/line_a/press-03/temp");
        for bad in ["temp", "a/b/c", "a/b/c/d/e"] {
            let e = bad.parse::<SeriesKey>().unwrap_err();
            assert!(
                matches!(
                    e,
                    TopicError::SeriesPath { .. } | TopicError::MachinePath { .. }
                ),
                "{bad}: {e}"
            );
        }
        let e = "a/b/c/t emp".parse::<SeriesKey>().unwrap_err();
        assert!(matches!(e, TopicError::BadId { what: "metric", .. }), "{e}");
    }

    #[test]
    fn round_trips_every_kind() {
        let id = MachineId::new("plant-1", "line_a", "press-03").unwrap();
        for kind in EventKind::ALL {
            let topic = id.topic(kind);
            assert_eq!(MachineId::parse_topic(&topic).unwrap(), (id.clone(), kind));
        }
        assert_eq!(
            id.topic(EventKind::Part),
            "factory/plant-1/line_a/press-03/part"
        );
    }

    #[test]
    fn refuses_bad_topics_with_a_reason() {
        let err = MachineId::parse_topic("sensors/x/y/z/state").unwrap_err();
        assert!(matches!(err, TopicError::NotFactory { .. }), "{err}");
        let err = MachineId::parse_topic("factory/a/b/state").unwrap_err();
        assert_eq!(
            err.to_string(),
            "topic `factory/a/b/state` has 4 levels, expected 5: `factory/{site}/{line}/{machine}/{kind}`"
        );
        let err = MachineId::parse_topic("factory/a/b/c/temperature").unwrap_err();
        assert!(
            err.to_string().contains("unknown event kind `temperature`"),
            "{err}"
        );
        let err = MachineId::parse_topic("factory/a b/b/c/state").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("site `a b` is not a valid identifier"),
            "{err}"
        );
        let long = "x".repeat(65);
        assert!(MachineId::parse_topic(&format!("factory/s/{long}/c/state")).is_err());
        assert!(MachineId::parse_topic("factory/s//c/state").is_err());
        assert!(MachineId::parse_topic("factory/s/l/c/state/extra").is_err());
    }

    #[test]
    fn long_topics_are_truncated_in_errors() {
        let topic = format!("nope/{}", "é".repeat(500));
        let msg = MachineId::parse_topic(&topic).unwrap_err().to_string();
        assert!(msg.len() < 400);
    }
}
