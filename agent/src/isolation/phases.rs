//! Start latency: when each phase of a task's start ended, stamped on the system-wide monotonic
//! clock so that the agent, the supervisor and the init (three processes) can add to one list.
#![allow(unsafe_code)]

/// Nanoseconds on the system-wide monotonic clock (the same in every process), to time a
/// start's phases across the agent, the supervisor and the init.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// When each phase of a start ended (`name=<mono_ns>` words), carried from the init through
/// the supervisor to the agent on the start-status pipes and logged there at debug level
/// (`RUST_LOG=mlp_agent=debug`): where a task's start time goes.
#[derive(Debug, Default, Clone)]
pub struct Phases {
    since: u64,
    words: String,
}

impl Phases {
    /// Phases counted from now.
    pub fn start() -> Phases {
        Phases { since: mono_ns(), words: String::new() }
    }
    /// Phases counted from `name`, which ended at `at_ns` (another part of the agent's clock
    /// reading, e.g. when the allocation arrived on the servers' stream).
    pub fn starting_at(name: &str, at_ns: u64) -> Phases {
        Phases { since: at_ns, words: format!(" {name}={at_ns}") }
    }
    /// These phases if any were noted, else phases counted from now.
    pub fn or_start(self) -> Phases {
        if self.words.is_empty() {
            Phases::start()
        } else {
            self
        }
    }
    /// Notes that `name` ended now.
    pub fn mark(&mut self, name: &str) {
        self.words.push_str(&format!(" {name}={}", mono_ns()));
    }
    /// Adds phases reported by another process.
    pub fn extend(&mut self, words: &str) {
        for w in words.split_whitespace() {
            self.words.push(' ');
            self.words.push_str(w);
        }
    }
    /// The words, each prefixed by a space.
    pub fn words(&self) -> &str {
        &self.words
    }
    /// Each phase's duration after the previous one, in microseconds: `name=+123us ...`.
    pub fn describe(&self) -> String {
        let mut prev = self.since;
        let mut out = String::new();
        for w in self.words.split_whitespace() {
            let Some((name, at)) = w.split_once('=') else {
                continue;
            };
            let Ok(at) = at.parse::<u64>() else {
                continue;
            };
            out.push_str(&format!("{name}=+{}us ", at.saturating_sub(prev) / 1000));
            prev = at.max(prev);
        }
        out.push_str(&format!("total={}us", prev.saturating_sub(self.since) / 1000));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_describe_each_step_after_the_previous() {
        let mut p = Phases { since: 1_000_000, words: String::new() };
        p.extend("a=3000000 b=3500000  junk c=nope");
        p.extend("d=3200000");
        // d ended before b (another process's clock reading): counted as 0, not negative.
        assert_eq!(p.describe(), "a=+2000us b=+500us d=+0us total=2500us");
        let mut q = Phases::start();
        q.mark("x");
        assert!(q.words().starts_with(" x="), "{}", q.words());
        let r = Phases::starting_at("got", 5_000_000).or_start();
        assert_eq!(r.words(), " got=5000000");
        assert!(Phases::default().or_start().since > 0);
    }
}
