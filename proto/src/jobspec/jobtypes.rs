//! Rules of the parameterized and periodic job types (issue 16 §2) that the validator, the
//! servers and the CLI share: cron expressions with time zones (`croner`, `chrono-tz`), the next
//! launch time, and whether a dispatch's payload and meta fit a `parameterized` block.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

use crate::consts::dispatch_payload;
use crate::v1::{Job, ParameterizedConfig, PeriodicConfig};

/// Largest dispatch payload (Nomad's limit): it is replicated with the child job.
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024;
/// Most cron expressions in one `periodic` block.
pub const MAX_CRONS: usize = 16;
/// Most keys in `meta_required` plus `meta_optional`.
pub const MAX_DISPATCH_META_KEYS: usize = 64;

/// A dispatch or periodic launch that cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JobTypeError(pub String);

/// Parses one cron expression: 5 fields (minute granularity) or 6 (seconds first); `@daily`
/// style aliases; no year field.
pub fn parse_cron(expr: &str) -> Result<Cron, JobTypeError> {
    if expr.len() > 256 {
        return Err(JobTypeError(format!("cron expression is {} bytes; at most 256", expr.len())));
    }
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| JobTypeError(format!("invalid cron expression {expr:?}: {e}")))
}

/// Parses an IANA time zone name; "" is UTC.
pub fn parse_time_zone(name: &str) -> Result<chrono_tz::Tz, JobTypeError> {
    if name.is_empty() {
        return Ok(chrono_tz::UTC);
    }
    name.parse::<chrono_tz::Tz>()
        .map_err(|_| JobTypeError(format!("unknown time zone {name:?}; write an IANA name such as \"UTC\" or \"Europe/Berlin\"")))
}

/// Whether the job is a parent (parameterized or periodic): it never places allocations itself.
pub fn is_parent(job: &Job) -> bool {
    job.parameterized.is_some() || job.periodic.is_some()
}

/// The first time strictly after `after_ms` (unix ms) at which any of the block's expressions
/// matches, in its time zone; `None` when the block does not parse or nothing matches.
pub fn next_launch_after(p: &PeriodicConfig, after_ms: u64) -> Option<u64> {
    let tz = parse_time_zone(&p.time_zone).ok()?;
    let after = DateTime::<Utc>::from_timestamp_millis(i64::try_from(after_ms).ok()?)?.with_timezone(&tz);
    p.crons
        .iter()
        .filter_map(|c| parse_cron(c).ok())
        .filter_map(|c| c.find_next_occurrence(&after, false).ok())
        .filter_map(|t| u64::try_from(t.with_timezone(&Utc).timestamp_millis()).ok())
        .min()
}

/// The latest time in `(after_ms, upto_ms]` at which the block matches: the one launch a leader
/// owes after `after_ms` (missed slots are launched once, not once each).
pub fn latest_launch_in(p: &PeriodicConfig, after_ms: u64, upto_ms: u64) -> Option<u64> {
    let tz = parse_time_zone(&p.time_zone).ok()?;
    let upto = DateTime::<Utc>::from_timestamp_millis(i64::try_from(upto_ms).ok()?)?.with_timezone(&tz);
    p.crons
        .iter()
        .filter_map(|c| parse_cron(c).ok())
        .filter_map(|c| c.find_previous_occurrence(&upto, true).ok())
        .filter_map(|t| u64::try_from(t.with_timezone(&Utc).timestamp_millis()).ok())
        .filter(|&t| t > after_ms && t <= upto_ms)
        .max()
}

/// Unix ms as RFC 3339 in UTC, for people.
pub fn format_time(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

/// Checks a dispatch's meta and payload against the job's `parameterized` block: required keys
/// present, no key outside required and optional, payload as `payload` says, payload size.
pub fn check_dispatch(job_id: &str, p: &ParameterizedConfig, meta: &BTreeMap<String, String>, payload: &[u8]) -> Result<(), JobTypeError> {
    let mut problems = Vec::new();
    let missing: Vec<&str> = p.meta_required.iter().filter(|k| !meta.contains_key(*k)).map(String::as_str).collect();
    if !missing.is_empty() {
        problems.push(format!("missing required meta key(s) {}: job {job_id:?} requires {:?}", quote(&missing), p.meta_required));
    }
    let unknown: Vec<&str> =
        meta.keys().filter(|k| !p.meta_required.contains(k) && !p.meta_optional.contains(k)).map(String::as_str).collect();
    if !unknown.is_empty() {
        let allowed: Vec<&String> = p.meta_required.iter().chain(&p.meta_optional).collect();
        problems.push(format!("meta key(s) {} not allowed by job {job_id:?} (allowed: {allowed:?})", quote(&unknown)));
    }
    for (k, v) in meta {
        if k.len() > 128 || v.len() > 4096 || k.contains('\0') || v.contains('\0') {
            problems.push(format!("meta {k:?}: keys are at most 128 bytes and values 4096, without NUL"));
        }
    }
    match p.payload.as_str() {
        dispatch_payload::REQUIRED if payload.is_empty() => {
            problems.push(format!("job {job_id:?} requires a payload (parameterized.payload = \"required\")"))
        }
        dispatch_payload::FORBIDDEN if !payload.is_empty() => problems
            .push(format!("job {job_id:?} forbids a payload (parameterized.payload = \"forbidden\"), found {} bytes", payload.len())),
        _ => {}
    }
    if payload.len() > MAX_PAYLOAD_BYTES {
        problems.push(format!("payload is {} bytes; at most {MAX_PAYLOAD_BYTES} (limit: dispatch payload)", payload.len()));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(JobTypeError(problems.join("; ")))
    }
}

fn quote(keys: &[&str]) -> String {
    keys.iter().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(", ")
}

/// The environment variable a meta key is exported as: `MLP_META_<key>` with every character
/// other than A-Z, a-z, 0-9 and `_` replaced by `_`.
pub fn meta_env_name(key: &str) -> String {
    let clean: String = key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    format!("MLP_META_{clean}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn periodic(crons: &[&str], tz: &str) -> PeriodicConfig {
        PeriodicConfig { crons: crons.iter().map(|c| c.to_string()).collect(), prohibit_overlap: false, time_zone: tz.into() }
    }

    // 2026-01-01T00:00:00Z
    const NEW_YEAR: u64 = 1_767_225_600_000;

    #[test]
    fn next_and_latest_launches_follow_the_time_zone() {
        let p = periodic(&["0 3 * * *"], "Europe/Berlin");
        // 03:00 Berlin in winter is 02:00 UTC.
        assert_eq!(next_launch_after(&p, NEW_YEAR), Some(NEW_YEAR + 2 * 3_600_000));
        let utc = periodic(&["0 3 * * *"], "");
        assert_eq!(next_launch_after(&utc, NEW_YEAR), Some(NEW_YEAR + 3 * 3_600_000));
        // Two slots missed: only the latest is owed.
        let every_minute = periodic(&["* * * * *"], "UTC");
        assert_eq!(latest_launch_in(&every_minute, NEW_YEAR, NEW_YEAR + 150_000), Some(NEW_YEAR + 120_000));
        assert_eq!(latest_launch_in(&every_minute, NEW_YEAR + 120_000, NEW_YEAR + 150_000), None);
        // Seconds field; the earliest of several expressions.
        let two = periodic(&["*/10 * * * * *", "0 0 * * *"], "");
        assert_eq!(next_launch_after(&two, NEW_YEAR), Some(NEW_YEAR + 10_000));
    }

    #[test]
    fn bad_crons_and_zones_say_what() {
        assert!(parse_cron("61 * * * *").is_err());
        assert!(parse_cron("* * *").is_err());
        assert!(parse_cron("0 3 * * * * 2030").is_err(), "no year field");
        assert!(parse_cron("0 3 * * *").is_ok());
        assert!(parse_cron("@daily").is_ok());
        let e = parse_time_zone("Mars/Olympus").unwrap_err();
        assert!(e.0.contains("Mars/Olympus"), "{e}");
    }

    #[test]
    fn dispatch_checks_meta_and_payload() {
        let p = ParameterizedConfig {
            payload: dispatch_payload::FORBIDDEN.into(),
            meta_required: vec!["dataset".into()],
            meta_optional: vec!["lr".into()],
        };
        let meta = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
        assert!(check_dispatch("t", &p, &meta(&[("dataset", "a"), ("lr", "0.1")]), b"").is_ok());
        let e = check_dispatch("t", &p, &meta(&[("lr", "0.1")]), b"").unwrap_err();
        assert!(e.0.contains("missing required meta key(s) \"dataset\""), "{e}");
        let e = check_dispatch("t", &p, &meta(&[("dataset", "a"), ("x", "1")]), b"").unwrap_err();
        assert!(e.0.contains("\"x\" not allowed"), "{e}");
        let e = check_dispatch("t", &p, &meta(&[("dataset", "a")]), b"data").unwrap_err();
        assert!(e.0.contains("forbids a payload"), "{e}");
        let req = ParameterizedConfig { payload: dispatch_payload::REQUIRED.into(), ..Default::default() };
        assert!(check_dispatch("t", &req, &BTreeMap::new(), b"").unwrap_err().0.contains("requires a payload"));
        assert!(check_dispatch("t", &req, &BTreeMap::new(), &vec![0; MAX_PAYLOAD_BYTES + 1]).is_err());
        assert_eq!(meta_env_name("data.set-x"), "MLP_META_data_set_x");
    }

    #[test]
    fn job_files_decode_the_blocks_and_point_at_bad_values() {
        let ok = r#"
job "train" {
  type = "batch"
  parameterized {
    payload       = "required"
    meta_required = ["dataset"]
    meta_optional = ["lr"]
  }
  group "g" {
    task "t" {
      driver = "raw_exec"
      config { command = "/bin/true" }
    }
  }
}
"#;
        let job = crate::jobspec::parse_str(ok, "train.hcl").unwrap();
        let p = job.parameterized.unwrap();
        assert_eq!((p.payload.as_str(), p.meta_required, p.meta_optional), ("required", vec!["dataset".into()], vec!["lr".into()]));

        let bad = r#"
job "nightly" {
  type = "service"
  periodic {
    crons     = ["0 3 * * *", "99 * * * *"]
    time_zone = "Mars/Olympus"
  }
  group "g" {
    task "t" {
      driver = "raw_exec"
      config { command = "/bin/true" }
    }
  }
}
"#;
        let e = crate::jobspec::parse_str(bad, "nightly.hcl").unwrap_err().to_string();
        assert!(e.contains("nightly.hcl:4:3: job.nightly.periodic: a periodic job must be of type batch or sysbatch"), "{e}");
        assert!(e.contains("nightly.hcl:5:31: job.nightly.periodic.crons[1]: invalid cron expression \"99 * * * *\""), "{e}");
        assert!(e.contains("nightly.hcl:6:17: job.nightly.periodic.time_zone: unknown time zone"), "{e}");
        let typo = bad.replace("time_zone", "timezone");
        let e = crate::jobspec::parse_str(&typo, "nightly.hcl").unwrap_err().to_string();
        assert!(e.contains("unknown field \"timezone\"; did you mean \"time_zone\"?"), "{e}");
    }

    #[test]
    fn system_groups_take_no_count_and_no_gang() {
        let spec = |kind: &str, extra: &str| {
            format!(
                "job \"s\" {{\n  type = \"{kind}\"\n  group \"g\" {{\n{extra}    task \"t\" {{\n      driver = \"raw_exec\"\n      config {{ command = \"/bin/true\" }}\n    }}\n  }}\n}}\n"
            )
        };
        assert!(crate::jobspec::parse_str(&spec("system", ""), "s.hcl").is_ok());
        assert!(crate::jobspec::parse_str(&spec("sysbatch", "    count = 1\n"), "s.hcl").is_ok());
        let e = crate::jobspec::parse_str(&spec("system", "    count = 3\n"), "s.hcl").unwrap_err().to_string();
        assert!(e.contains("s.hcl:4:13: job.s.group.g.count: a system job runs one allocation per eligible node"), "{e}");
        let e = crate::jobspec::parse_str(&spec("sysbatch", "    gang = true\n"), "s.hcl").unwrap_err().to_string();
        assert!(e.contains("a sysbatch job cannot have gang groups"), "{e}");
        let e = crate::jobspec::parse_str(
            &spec("system", "").replace("type = \"system\"", "type = \"system\"\n  periodic {\n    crons = [\"@daily\"]\n  }"),
            "s.hcl",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("a periodic job must be of type batch or sysbatch, found \"system\""), "{e}");
    }
}
