//! Times as people and scripts write them in queries and on the command line.

/// A time that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{name}` = `{value}` is not a time: expected Unix milliseconds, RFC 3339 (2026-01-05T06:00:00Z) or a duration before now (-2h)"
)]
pub struct TimeError {
    /// The parameter's name.
    pub name: String,
    /// The value as given.
    pub value: String,
}

/// Parses a time given as parameter `name`: Unix milliseconds, RFC 3339, or a duration before
/// `now_ms` (`-2h`, `-15m`, `-7days`). Returns Unix milliseconds.
pub fn parse_time_at(name: &str, v: &str, now_ms: i64) -> Result<i64, TimeError> {
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(ms);
    }
    if let Some(d) = v
        .strip_prefix('-')
        .and_then(|d| humantime::parse_duration(d).ok())
    {
        return Ok(now_ms - d.as_millis() as i64);
    }
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|d| d.timestamp_millis())
        .map_err(|_| TimeError {
            name: name.to_owned(),
            value: v.chars().take(80).collect(),
        })
}

/// [`parse_time_at`] relative to the current time.
pub fn parse_time(name: &str, v: &str) -> Result<i64, TimeError> {
    parse_time_at(name, v, chrono::Utc::now().timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_millis_rfc3339_and_durations_before_now() {
        let now = 1_767_600_000_000;
        assert_eq!(parse_time_at("from", "1767600000000", now), Ok(now));
        assert_eq!(
            parse_time_at("from", "2026-01-05T08:00:00Z", now),
            Ok(1_767_600_000_000)
        );
        assert_eq!(parse_time_at("from", "-2h", now), Ok(now - 7_200_000));
        let e = parse_time_at("from", "yesterday", now).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`from` = `yesterday` is not a time: expected Unix milliseconds, RFC 3339 (2026-01-05T06:00:00Z) or a duration before now (-2h)"
        );
    }
}
