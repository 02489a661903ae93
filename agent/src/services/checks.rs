//! Health checks of a service instance (issue 13 §3), run by the agent from the host:
//!
//! * `http`: `GET path` over HTTP/1.0 to the instance's address and port; a 2xx status passes.
//! * `tcp`: a TCP connection to the address and port is accepted.
//! * `script`: `command args` exits with status 0. It runs as the agent, on the host, in the
//!   allocation's directory, joined to the allocation's network namespace in bridge mode (through
//!   `nsenter --net`), but not inside the task's root, cgroup or other namespaces (documented in
//!   docs/jobspec.md).
//!
//! Every check is bounded by its `timeout`; a check that runs over it fails.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mlp_proto::consts::check_type;
use mlp_proto::v1::ServiceCheck;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes of a check's output kept (the servers keep at most 1 KiB).
pub const MAX_OUTPUT: usize = 512;

/// The outcome of one run of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub passing: bool,
    pub output: String,
}

impl CheckResult {
    fn pass(output: impl Into<String>) -> CheckResult {
        CheckResult { passing: true, output: bounded(output.into()) }
    }
    fn fail(output: impl Into<String>) -> CheckResult {
        CheckResult { passing: false, output: bounded(output.into()) }
    }
}

fn bounded(mut s: String) -> String {
    if s.len() > MAX_OUTPUT {
        let mut end = MAX_OUTPUT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Where a check runs against.
#[derive(Debug, Clone)]
pub struct Target {
    /// The instance's address and the check's port (None: the service has no port).
    pub addr: Option<SocketAddr>,
    /// The allocation's network namespace (bridge mode), for script checks.
    pub netns: Option<PathBuf>,
    /// The allocation's directory (working directory of script checks).
    pub alloc_dir: PathBuf,
}

/// Runs one check once, within its timeout.
pub async fn run(check: &ServiceCheck, target: &Target) -> CheckResult {
    let timeout = Duration::from_millis(check.timeout_ms.max(1));
    let what = check.r#type.as_str();
    let fut = async {
        match what {
            check_type::HTTP => match target.addr {
                Some(addr) => http(addr, &check.path).await,
                None => CheckResult::fail("the service has no port to check"),
            },
            check_type::TCP => match target.addr {
                Some(addr) => match tokio::net::TcpStream::connect(addr).await {
                    Ok(_) => CheckResult::pass(format!("TCP connect {addr}: success")),
                    Err(e) => CheckResult::fail(format!("TCP connect {addr}: {e}")),
                },
                None => CheckResult::fail("the service has no port to check"),
            },
            check_type::SCRIPT => script(&check.command, &check.args, target.netns.as_deref(), &target.alloc_dir).await,
            other => CheckResult::fail(format!("unknown check type {other:?}")),
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => CheckResult::fail(format!("{what} check timed out after {} ms", timeout.as_millis())),
    }
}

/// `GET path HTTP/1.0`; passes on a 2xx status line.
async fn http(addr: SocketAddr, path: &str) -> CheckResult {
    let mut stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return CheckResult::fail(format!("GET http://{addr}{path}: connect: {e}")),
    };
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: mlp-health-check\r\nAccept: */*\r\n\r\n");
    if let Err(e) = stream.write_all(req.as_bytes()).await {
        return CheckResult::fail(format!("GET http://{addr}{path}: send: {e}"));
    }
    // The status line is all a check needs: read until its end (or 1 KiB).
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 1024 {
        match stream.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return CheckResult::fail(format!("GET http://{addr}{path}: read: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().next().unwrap_or("").trim().to_string();
    match status_code(&line) {
        Some(code) if (200..300).contains(&code) => CheckResult::pass(format!("HTTP GET http://{addr}{path}: {line}")),
        Some(_) => CheckResult::fail(format!("HTTP GET http://{addr}{path}: {line}")),
        None => CheckResult::fail(format!("HTTP GET http://{addr}{path}: no HTTP status line in the answer ({line:?})")),
    }
}

/// The status code of an HTTP status line (`HTTP/1.1 200 OK`).
pub fn status_code(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// Runs `command args`; exit status 0 passes. Killed when the check's timeout drops it.
async fn script(command: &str, args: &[String], netns: Option<&Path>, dir: &Path) -> CheckResult {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = tokio::process::Command::new("nsenter");
            c.arg(format!("--net={}", ns.display())).arg("--").arg(command).args(args);
            c
        }
        None => {
            let mut c = tokio::process::Command::new(command);
            c.args(args);
            c
        }
    };
    cmd.current_dir(dir).stdin(std::process::Stdio::null()).kill_on_drop(true);
    match cmd.output().await {
        Ok(out) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            if out.status.success() {
                CheckResult::pass(text)
            } else {
                CheckResult::fail(format!("{command}: {}: {text}", out.status))
            }
        }
        Err(e) => CheckResult::fail(format!("running {command}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(status_code("HTTP/1.0 200 OK"), Some(200));
        assert_eq!(status_code("HTTP/1.1 404 File not found"), Some(404));
        assert_eq!(status_code("SSH-2.0-OpenSSH"), None);
        assert_eq!(status_code(""), None);
    }

    fn check(kind: &str) -> ServiceCheck {
        ServiceCheck { r#type: kind.into(), path: "/".into(), interval_ms: 1000, timeout_ms: 1000, ..Default::default() }
    }

    #[tokio::test]
    async fn http_and_tcp_checks_pass_and_fail() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let status = if n == 0 { "200 OK" } else { "500 Internal Server Error" };
                n += 1;
                let _ = s.write_all(format!("HTTP/1.0 {status}\r\n\r\n").as_bytes()).await;
            }
        });
        let target = Target { addr: Some(addr), netns: None, alloc_dir: std::env::temp_dir() };
        let first = run(&check("http"), &target).await;
        assert!(first.passing, "{first:?}");
        let second = run(&check("http"), &target).await;
        assert!(!second.passing && second.output.contains("500"), "{second:?}");
        assert!(run(&check("tcp"), &target).await.passing);
        // A port nothing listens on (the listener's, after it is gone, is racy: use port 1).
        let closed = Target { addr: Some("127.0.0.1:1".parse().expect("addr")), ..target.clone() };
        assert!(!run(&check("tcp"), &closed).await.passing);
        assert!(!run(&check("http"), &closed).await.passing);
    }

    #[tokio::test]
    async fn script_checks_follow_the_exit_status() {
        let target = Target { addr: None, netns: None, alloc_dir: std::env::temp_dir() };
        let mut c = check("script");
        c.command = "/bin/sh".into();
        c.args = vec!["-c".into(), "echo fine".into()];
        let ok = run(&c, &target).await;
        assert!(ok.passing && ok.output.contains("fine"), "{ok:?}");
        c.args = vec!["-c".into(), "echo broken; exit 3".into()];
        let bad = run(&c, &target).await;
        assert!(!bad.passing && bad.output.contains("broken"), "{bad:?}");
        c.args = vec!["-c".into(), "sleep 5".into()];
        c.timeout_ms = 200;
        let slow = run(&c, &target).await;
        assert!(!slow.passing && slow.output.contains("timed out"), "{slow:?}");
    }
}
