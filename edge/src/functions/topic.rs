//! MQTT topic filters (`+` one level, `#` the rest) for topic triggers.

/// A validated MQTT topic filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    levels: Vec<String>,
}

impl TopicFilter {
    /// Parses a filter, with a reason when it is not a valid MQTT filter.
    pub fn parse(filter: &str) -> Result<Self, String> {
        if filter.is_empty() {
            return Err("a topic filter cannot be empty".into());
        }
        if filter.len() > 1024 || filter.contains('\0') {
            return Err(format!("topic filter `{filter}`: too long or contains NUL"));
        }
        let levels: Vec<String> = filter.split('/').map(str::to_owned).collect();
        for (i, l) in levels.iter().enumerate() {
            if l.contains('#') && (l != "#" || i + 1 != levels.len()) {
                return Err(format!(
                    "topic filter `{filter}`: `#` must be a whole level and the last one"
                ));
            }
            if l.contains('+') && l != "+" {
                return Err(format!(
                    "topic filter `{filter}`: `+` must be a whole level"
                ));
            }
        }
        Ok(Self { levels })
    }

    /// Whether `topic` matches this filter.
    pub fn matches(&self, topic: &str) -> bool {
        self.matches_iter(topic.split('/'))
    }

    /// Whether the topic made of these levels matches (no string built per event).
    pub fn matches_levels(&self, levels: &[&str]) -> bool {
        self.matches_iter(levels.iter().copied())
    }

    fn matches_iter<'a>(&self, mut t: impl Iterator<Item = &'a str>) -> bool {
        for l in &self.levels {
            match l.as_str() {
                "#" => return true,
                "+" => {
                    if t.next().is_none() {
                        return false;
                    }
                }
                exact => {
                    if t.next() != Some(exact) {
                        return false;
                    }
                }
            }
        }
        t.next().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_mqtt() {
        let f = |s| TopicFilter::parse(s).unwrap();
        assert!(f("factory/+/+/+/telemetry").matches("factory/p/l/m/telemetry"));
        assert!(!f("factory/+/+/+/telemetry").matches("factory/p/l/m/part"));
        assert!(!f("factory/+/+/+/telemetry").matches("factory/p/l/telemetry"));
        assert!(f("factory/#").matches("factory/p/l/m/part"));
        assert!(f("factory/#").matches("factory"));
        assert!(f("#").matches("a/b"));
        assert!(f("a/+").matches("a/"));
        assert!(!f("a/b").matches("a/b/c"));
        assert!(f("factory/+/+/+/telemetry").matches_levels(&[
            "factory",
            "p",
            "l",
            "m",
            "telemetry"
        ]));
        assert!(!f("factory/+/l2/#").matches_levels(&["factory", "p", "l", "m", "telemetry"]));
        for bad in ["", "a/#/b", "a/b#", "a/+b", "a+/c"] {
            assert!(TopicFilter::parse(bad).is_err(), "{bad}");
        }
    }
}
