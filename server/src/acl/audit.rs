//! The audit log: `<data-dir>/audit.log`, one JSON object per line for every denied request and
//! every privileged one (alloc exec, snapshot save/restore, Raft peer changes, garbage
//! collection, ACL changes), each also a `tracing` event (target `mlp::audit`). A line names
//! the token by its accessor id, never its secret.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::Serialize;

/// One audited request.
#[derive(Debug, Clone, Serialize)]
pub struct Record<'a> {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// The token's accessor id; "anonymous" without a valid token.
    pub accessor: &'a str,
    /// `grpc` or `http`.
    pub transport: &'a str,
    /// The gRPC method path or `METHOD /path`.
    pub operation: &'a str,
    /// What it was about (job, allocation, policy, token), when known.
    pub target: &'a str,
    /// `allowed` or `denied`.
    pub result: &'a str,
    /// Why it was denied (or what it needed).
    pub reason: &'a str,
}

/// Appends records to the audit file (opened on first use, kept open).
#[derive(Debug)]
pub struct Audit {
    path: Option<PathBuf>,
    file: Mutex<Option<std::fs::File>>,
}

impl Audit {
    /// An audit log at `path`; `None` records only as tracing events.
    pub fn new(path: Option<PathBuf>) -> Audit {
        Audit { path, file: Mutex::new(None) }
    }

    pub fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }

    pub fn record(&self, r: &Record<'_>) {
        if r.result == "denied" {
            tracing::warn!(target: "mlp::audit", accessor = r.accessor, operation = r.operation, target_object = r.target, reason = r.reason, "request denied");
        } else {
            tracing::info!(target: "mlp::audit", accessor = r.accessor, operation = r.operation, target_object = r.target, "privileged request");
        }
        let Some(path) = &self.path else { return };
        let line = match serde_json::to_string(r) {
            Ok(l) => l + "\n",
            Err(e) => {
                tracing::error!(error = %e, "audit record does not serialize");
                return;
            }
        };
        let mut guard = match self.file.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if guard.is_none() {
            match std::fs::OpenOptions::new().create(true).append(true).open(path) {
                Ok(f) => *guard = Some(f),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot open the audit log");
                    return;
                }
            }
        }
        if let Some(f) = guard.as_mut() {
            if let Err(e) = f.write_all(line.as_bytes()) {
                tracing::error!(path = %path.display(), error = %e, "cannot write the audit log");
                *guard = None;
            }
        }
    }
}

/// `ms` since the epoch as RFC 3339 (`2026-12-05T13:58:03.123Z`).
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, ms % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_lines() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_796_479_083_123), "2026-12-05T13:58:03.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        let dir = tempfile::tempdir().expect("tempdir");
        let audit = Audit::new(Some(dir.path().join("audit.log")));
        let r = Record {
            time: rfc3339(0),
            accessor: "acc",
            transport: "grpc",
            operation: "op",
            target: "t",
            result: "denied",
            reason: "no token",
        };
        audit.record(&r);
        audit.record(&Record { result: "allowed", ..r });
        let text = std::fs::read_to_string(dir.path().join("audit.log")).expect("read");
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["result"], "denied");
        assert_eq!(lines[1]["accessor"], "acc");
    }
}
