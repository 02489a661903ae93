//! The restart decision: a pure function from (job type, exit outcome, restart policy, restart
//! history, now) to what the task runner does next. Kept free of I/O so it can be table-tested.

use mlp_proto::consts::{job_type, restart_mode};
use mlp_proto::v1::RestartPolicy;

/// How many restarts happened in the current interval, and when that interval began.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RestartTracker {
    /// Restarts counted in the current interval.
    pub count: u32,
    /// Start of the current interval (unix ms).
    pub interval_start_ms: u64,
}

/// What to do after a task exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartDecision {
    /// The task finished successfully (batch, exit 0): dead, not failed.
    Done,
    /// Restart after `delay_ms`.
    Restart {
        /// How long to wait before starting again.
        delay_ms: u64,
    },
    /// Give up: dead, failed. The message explains why.
    Fail {
        /// Event message, e.g. "exceeded allowed attempts 2 in interval 30m0s".
        message: String,
    },
}

/// The policy Nomad uses when a group has none: batch 3 attempts in 24h, service 2 in 30m,
/// 15 s delay, mode fail.
pub fn default_policy(job_type_name: &str) -> RestartPolicy {
    if job_type::is_batch(job_type_name) {
        RestartPolicy { attempts: 3, interval_ms: 24 * 3600 * 1000, delay_ms: 15_000, mode: restart_mode::FAIL.to_string() }
    } else {
        RestartPolicy { attempts: 2, interval_ms: 30 * 60 * 1000, delay_ms: 15_000, mode: restart_mode::FAIL.to_string() }
    }
}

/// Decides what happens after an exit. `success` is exit code 0. Returns the decision and the
/// tracker to use from now on (counting the restart, if one is decided).
pub fn decide(
    job_type_name: &str,
    success: bool,
    policy: &RestartPolicy,
    tracker: RestartTracker,
    now_ms: u64,
) -> (RestartDecision, RestartTracker) {
    if job_type::is_batch(job_type_name) && success {
        return (RestartDecision::Done, tracker);
    }
    let mut t = tracker;
    // interval 0 = one window that never ends.
    if policy.interval_ms > 0 && now_ms.saturating_sub(t.interval_start_ms) >= policy.interval_ms {
        t = RestartTracker { count: 0, interval_start_ms: now_ms };
    }
    if t.count < policy.attempts {
        t.count += 1;
        return (RestartDecision::Restart { delay_ms: policy.delay_ms }, t);
    }
    if policy.mode == restart_mode::DELAY {
        if policy.interval_ms == 0 {
            return (RestartDecision::Restart { delay_ms: policy.delay_ms }, t);
        }
        let end = t.interval_start_ms.saturating_add(policy.interval_ms);
        let wait = end.saturating_sub(now_ms).max(policy.delay_ms);
        return (RestartDecision::Restart { delay_ms: wait }, RestartTracker { count: 1, interval_start_ms: now_ms.saturating_add(wait) });
    }
    (
        RestartDecision::Fail {
            message: format!("exceeded allowed attempts {} in interval {}", policy.attempts, fmt_duration_ms(policy.interval_ms)),
        },
        t,
    )
}

/// Formats milliseconds the way Go formats a `time.Duration`: "100ms", "15s", "1.5s",
/// "1m30s", "30m0s", "24h0m0s".
pub fn fmt_duration_ms(ms: u64) -> String {
    if ms == 0 {
        return "0s".to_string();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let h = ms / 3_600_000;
    let m = (ms % 3_600_000) / 60_000;
    let s_ms = ms % 60_000;
    let frac_ms = s_ms % 1000;
    let secs = if frac_ms == 0 {
        format!("{}s", s_ms / 1000)
    } else {
        let frac = format!("{frac_ms:03}");
        format!("{}.{}s", s_ms / 1000, frac.trim_end_matches('0'))
    };
    if h > 0 {
        format!("{h}h{m}m{secs}")
    } else if m > 0 {
        format!("{m}m{secs}")
    } else {
        secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pol(attempts: u32, interval_ms: u64, delay_ms: u64, mode: &str) -> RestartPolicy {
        RestartPolicy { attempts, interval_ms, delay_ms, mode: mode.to_string() }
    }

    fn tr(count: u32, start: u64) -> RestartTracker {
        RestartTracker { count, interval_start_ms: start }
    }

    #[test]
    fn decision_table() {
        use RestartDecision::*;
        let fail = restart_mode::FAIL;
        let delay = restart_mode::DELAY;
        let cases: Vec<(&str, bool, RestartPolicy, RestartTracker, u64, RestartDecision, RestartTracker)> = vec![
            // batch success: done, tracker unchanged
            ("batch", true, pol(2, 1000, 10, fail), tr(0, 0), 5, Done, tr(0, 0)),
            // batch failure: restart
            ("batch", false, pol(2, 1000, 10, fail), tr(0, 0), 5, Restart { delay_ms: 10 }, tr(1, 0)),
            // service success: restart too
            ("service", true, pol(2, 1000, 10, fail), tr(1, 0), 5, Restart { delay_ms: 10 }, tr(2, 0)),
            // attempts exhausted within the interval, mode fail
            (
                "service",
                false,
                pol(2, 1_800_000, 10, fail),
                tr(2, 0),
                5,
                Fail { message: "exceeded allowed attempts 2 in interval 30m0s".into() },
                tr(2, 0),
            ),
            // attempts exhausted but interval elapsed: reset and restart
            ("service", false, pol(2, 1000, 10, fail), tr(2, 0), 1500, Restart { delay_ms: 10 }, tr(1, 1500)),
            // attempts 0, mode fail: fail at once
            (
                "batch",
                false,
                pol(0, 1000, 10, fail),
                tr(0, 0),
                5,
                Fail { message: "exceeded allowed attempts 0 in interval 1s".into() },
                tr(0, 0),
            ),
            // mode delay: wait until the interval ends
            ("service", false, pol(1, 1000, 10, delay), tr(1, 0), 300, Restart { delay_ms: 700 }, tr(1, 1000)),
            // mode delay with delay longer than the rest of the interval
            ("service", false, pol(1, 1000, 900, delay), tr(1, 0), 300, Restart { delay_ms: 900 }, tr(1, 1200)),
            // interval 0: never resets
            (
                "service",
                false,
                pol(1, 0, 10, fail),
                tr(1, 0),
                1_000_000,
                Fail { message: "exceeded allowed attempts 1 in interval 0s".into() },
                tr(1, 0),
            ),
        ];
        for (i, (jt, ok, p, t, now, want, want_t)) in cases.into_iter().enumerate() {
            let (got, got_t) = decide(jt, ok, &p, t, now);
            assert_eq!(got, want, "case {i}");
            assert_eq!(got_t, want_t, "case {i} tracker");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(fmt_duration_ms(0), "0s");
        assert_eq!(fmt_duration_ms(100), "100ms");
        assert_eq!(fmt_duration_ms(15_000), "15s");
        assert_eq!(fmt_duration_ms(1_500), "1.5s");
        assert_eq!(fmt_duration_ms(90_000), "1m30s");
        assert_eq!(fmt_duration_ms(1_800_000), "30m0s");
        assert_eq!(fmt_duration_ms(86_400_000), "24h0m0s");
    }

    #[test]
    fn defaults() {
        assert_eq!(default_policy("batch").attempts, 3);
        assert_eq!(default_policy("service").attempts, 2);
    }
}
