//! Schedules: cron expressions, the next time each fires, and the scheduler thread that fires
//! what is due.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{FunctionError, Functions, Input, Job, TriggerKind};

pub(super) fn parse_schedule(s: &str) -> Result<croner::Cron, FunctionError> {
    s.parse::<croner::Cron>()
        .map_err(|e| FunctionError::Invalid(format!("schedule `{s}`: {e}")))
}

/// The first time `cron` fires strictly after `after_ms`.
pub(super) fn next_occurrence(cron: &croner::Cron, after_ms: i64) -> Option<i64> {
    let t = chrono::DateTime::from_timestamp_millis(after_ms)?;
    cron.find_next_occurrence(&t, false)
        .ok()
        .map(|d| d.timestamp_millis())
}

impl Functions {
    /// Fires every schedule due at `now_ms` (at most once per function: runs missed while
    /// the edge was busy or down are skipped). Returns how many fired.
    pub fn fire_due(&self, now_ms: i64) -> usize {
        let reg = self.inner.registry.read().expect("registry");
        let mut fired = 0;
        for d in reg.values() {
            let Some(cron) = &d.schedule else { continue };
            if !d.enabled.load(Ordering::Relaxed) {
                continue;
            }
            let mut next = d.next_fire.lock().expect("fire lock");
            let Some(due) = *next else { continue };
            if due > now_ms {
                continue;
            }
            *next = next_occurrence(cron, now_ms);
            let input = Input {
                trigger: TriggerKind::Schedule,
                topic: "".into(),
                device: "".into(),
                ts_ms: due,
                event: None,
                payload: Some(Arc::new(
                    serde_json::to_vec(&serde_json::json!({ "scheduled_ms": due })).expect("json"),
                )),
                log_seq: None,
                fired_ms: Some(now_ms),
                replay_at: None,
            };
            if Self::offer(
                d,
                Job {
                    input,
                    enqueued: Instant::now(),
                    reply: None,
                },
            ) {
                fired += 1;
            }
        }
        fired
    }

    fn next_due(&self) -> Option<i64> {
        let reg = self.inner.registry.read().expect("registry");
        reg.values()
            .filter(|d| d.enabled.load(Ordering::Relaxed))
            .filter_map(|d| *d.next_fire.lock().expect("fire lock"))
            .min()
    }

    pub(super) fn scheduler(&self, wake: flume::Receiver<()>) {
        while !self.inner.stop.load(Ordering::Relaxed) {
            let now = self.inner.clock.now_ms();
            self.fire_due(now);
            let wait = self.next_due().map_or(1000, |t| (t - now).clamp(1, 1000)) as u64;
            let _ = wake.recv_timeout(Duration::from_millis(wait));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_fire_strictly_after_the_given_time() {
        // 2026-01-05T08:00:00Z
        let t0 = 1_767_600_000_000;
        let every_minute = parse_schedule("* * * * *").unwrap();
        assert_eq!(next_occurrence(&every_minute, t0), Some(t0 + 60_000));
        assert_eq!(
            next_occurrence(&every_minute, t0 + 30_000),
            Some(t0 + 60_000)
        );
        let hourly = parse_schedule("0 * * * *").unwrap();
        assert_eq!(next_occurrence(&hourly, t0), Some(t0 + 3_600_000));
        let e = parse_schedule("every minute").unwrap_err();
        assert!(e.to_string().starts_with("schedule `every minute`"), "{e}");
    }
}
