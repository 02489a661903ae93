//! End-to-end tests of `mlp alloc exec` through a real `mlp dev`: the CLI talks gRPC to the
//! server, which proxies the session to the agent, which enters the running task (exec driver:
//! its namespaces, root, cgroup and user) or runs beside it (raw_exec). The `Dev` guard kills
//! what the cluster started, also when a test fails.
#![allow(unsafe_code)]

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{mlp, processes_under, status, wait_for, Dev};

/// Runs `mlp alloc exec ARGS` with `stdin` as its input.
fn exec(dev: &Dev, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(mlp())
        .args(["alloc", "exec"])
        .args(args)
        .env("MLP_ADDR", &dev.grpc)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mlp alloc exec");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait mlp alloc exec");
    let _ = writer.join();
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `mlp alloc exec` that must succeed; returns its stdout.
fn exec_ok(dev: &Dev, args: &[&str]) -> String {
    let out = exec(dev, args, b"");
    assert!(
        out.status.success(),
        "mlp alloc exec {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndev log tail: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr),
        common::tail(&dev.log(), 3000)
    );
    text(&out.stdout)
}

/// Runs `mlp alloc exec ARGS` until its trimmed stdout is `want` (a task writes its file a
/// moment after it is reported running); returns the last output.
fn exec_until(dev: &Dev, args: &[&str], want: &str) -> String {
    let mut last = String::new();
    for _ in 0..100 {
        let out = exec(dev, args, b"");
        last = format!("{}{}", text(&out.stdout), text(&out.stderr));
        if out.status.success() && text(&out.stdout).trim() == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    last.trim().to_string()
}

/// Starts a one-task service job and returns its running allocation's id.
fn start_job(dev: &Dev, name: &str, driver: &str, script: &str) -> String {
    let body = format!(
        r#"job "{name}" {{
  type = "service"
  group "grp" {{
    task "main" {{
      driver = "{driver}"
      config {{
        command = "/bin/sh"
        args    = ["-c", "{script}"]
      }}
    }}
  }}
}}
"#
    );
    let file = dev.write_job(&format!("{name}.hcl"), &body);
    dev.ok(&["job", "run", "--detach", file.to_str().unwrap_or_default()]);
    let allocs = dev.wait_allocs(name, "the task to run", Duration::from_secs(60), |a| a.len() == 1 && status(&a[0]) == "running");
    allocs[0]["id"].as_str().unwrap_or_default().to_string()
}

/// Host pids whose command line contains `needle`.
fn host_processes_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = text(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && common::pid_alive(pid) {
            out.push(pid);
        }
    }
    out
}

fn numeric_lines(s: &str) -> usize {
    s.lines().filter(|l| !l.trim().is_empty() && l.trim().chars().all(|c| c.is_ascii_digit())).count()
}

#[test]
fn exec_enters_an_exec_task() {
    if !common::require_exec() {
        return;
    }
    let dev = Dev::start();
    let id = start_job(&dev, "box", "exec", "echo from-task > /local/note; exec sleep 3600");
    let short: String = id.chars().filter(|c| *c != '-').take(8).collect();

    // The task's UTS namespace.
    assert_eq!(exec_ok(&dev, &[&id, "--", "hostname"]).trim(), format!("grp-0-{short}"));
    // A unique prefix works like the full id.
    assert_eq!(exec_ok(&dev, &[&id[..8], "--", "cat", "/proc/sys/kernel/hostname"]).trim(), format!("grp-0-{short}"));

    // The task's PID namespace: its init, the task's sleep and the exec'd ps, nothing else
    // (once the task's shell has exec'd its sleep).
    let mut ps = String::new();
    for _ in 0..100 {
        ps = exec_ok(&dev, &[&id, "--", "ps", "-e", "-o", "pid=,comm="]);
        if ps.contains("sleep") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let comms: Vec<&str> = ps.lines().filter_map(|l| l.split_whitespace().nth(1)).collect();
    assert_eq!(comms.len(), 3, "ps in the task:\n{ps}");
    assert!(comms.contains(&"sleep") && comms.contains(&"ps"), "ps in the task:\n{ps}");
    assert!(comms.contains(&"mlp-init"), "the task's init names itself:\n{ps}");
    assert!(ps.lines().any(|l| l.split_whitespace().next() == Some("1")), "no PID 1:\n{ps}");
    let ls = exec_ok(&dev, &[&id, "--", "ls", "/proc"]);
    assert_eq!(numeric_lines(&ls), 3, "ls /proc in the task:\n{ls}");

    // The task's root: what it wrote under /local, and no host paths.
    assert_eq!(exec_until(&dev, &[&id, "--", "cat", "/local/note"], "from-task"), "from-task");
    let outside = dev.dir.path().join("dev.log");
    let out = exec(&dev, &[&id, "--", "ls", outside.to_str().unwrap_or_default()], b"");
    assert!(!out.status.success(), "the host's {} is visible inside the task", outside.display());
    // The task's working directory and environment.
    assert_eq!(exec_ok(&dev, &[&id, "--", "pwd"]).trim(), "/local");
    assert_eq!(exec_ok(&dev, &[&id, "--", "sh", "-c", "echo $MLP_ALLOC_ID $MLP_TASK_NAME"]).trim(), format!("{id} main"));

    // The task's user, capabilities, no_new_privs and cgroup.
    let ids =
        exec_ok(&dev, &[&id, "--", "sh", "-c", "id -u; grep -E '^(CapBnd|CapEff|NoNewPrivs)' /proc/self/status; cat /proc/self/cgroup"]);
    assert!(ids.lines().next() == Some("65534"), "{ids}");
    assert!(ids.contains("CapBnd:\t0000000000000000"), "{ids}");
    assert!(ids.contains("CapEff:\t0000000000000000"), "{ids}");
    assert!(ids.contains("NoNewPrivs:\t1"), "{ids}");
    assert!(ids.contains(&format!("/mlp/{id}.main")), "not in the task's cgroup:\n{ids}");

    // stdin round trip, stdout and stderr apart, the exit code.
    let input = b"line one\nline two\n\x00binary\xff\n";
    let out = exec(&dev, &[&id, "--", "cat"], input);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout, input);
    let out = exec(&dev, &[&id, "--", "sh", "-c", "echo out; echo err >&2; exit 7"], b"");
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    // -i=false: the command gets an empty stdin even when there is input.
    let out = exec(&dev, &["-i=false", &id, "--", "cat"], b"ignored\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "");
    // Killed by a signal: 128 + signal.
    let out = exec(&dev, &[&id, "--", "sh", "-c", "kill -9 $$"], b"");
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));

    // TTY mode: stdin and stdout are a terminal of the default size; without -t they are not.
    let out = exec_ok(&dev, &["-t", &id, "--", "sh", "-c", "test -t 0 && test -t 1 && echo is-a-tty; stty size"]);
    assert!(out.contains("is-a-tty"), "{out:?}");
    assert!(out.contains("24 80"), "{out:?}");
    let out = exec_ok(&dev, &[&id, "--", "sh", "-c", "test -t 0 || test -t 1 || echo no-tty"]);
    assert_eq!(out.trim(), "no-tty");
    // A terminal carries input too (echoed back by the terminal's line discipline).
    let out = exec(&dev, &["-t", &id, "--", "sh", "-c", "read line; echo got:$line"], b"typed\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("got:typed"), "{:?}", text(&out.stdout));

    // Errors, each with a message that names what is wrong.
    let out = exec(&dev, &[&id, "--", "/no/such/binary"], b"");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("/no/such/binary"), "{}", text(&out.stderr));
    let out = exec(&dev, &["--task", "nope", &id, "--", "true"], b"");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains(r#"task "nope" not in allocation"#), "{}", text(&out.stderr));
    let out = exec(&dev, &["ffffffff-0000", "--", "true"], b"");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains(r#"no allocation with id or prefix "ffffffff-0000""#), "{}", text(&out.stderr));
    let out = exec(&dev, &[&id], b"");
    assert!(!out.status.success(), "a command is required");

    // Every session above left nothing behind inside the task (a killed process may take a
    // moment to be reaped by the task's init).
    let mut last = String::new();
    let clean = (0..50).any(|_| {
        last = exec_ok(&dev, &[&id, "--", "ps", "-e", "-o", "stat=,comm="]);
        let n = last.lines().count();
        if n != 3 {
            std::thread::sleep(Duration::from_millis(100));
        }
        n == 3
    });
    assert!(clean, "leftovers in the task:\n{last}");
}

#[test]
fn exec_sessions_leave_no_process_behind() {
    if !common::require_exec() {
        return;
    }
    let dev = Dev::start();
    let id = start_job(&dev, "bg", "exec", "exec sleep 3600");

    // A background process of a finished command dies with its session.
    let out = exec_ok(&dev, &[&id, "--", "sh", "-c", "sleep 1001 & echo started"]);
    assert_eq!(out.trim(), "started");
    wait_for("the session's background process to go", Duration::from_secs(15), || {
        host_processes_with("sleep 1001").is_empty().then_some(())
    });

    // A client that goes away (kill -9) ends its session and the whole tree.
    let mut cli = Command::new(mlp())
        .args(["alloc", "exec", &id, "--", "sh", "-c", "sleep 1002 & sleep 1003"])
        .env("MLP_ADDR", &dev.grpc)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run mlp alloc exec");
    wait_for("the exec'd commands to run", Duration::from_secs(30), || {
        (!host_processes_with("sleep 1002").is_empty() && !host_processes_with("sleep 1003").is_empty()).then_some(())
    });
    let _ = cli.kill();
    let _ = cli.wait();
    wait_for("the aborted session's processes to go", Duration::from_secs(15), || {
        (host_processes_with("sleep 1002").is_empty() && host_processes_with("sleep 1003").is_empty()).then_some(())
    });
    // The task itself is untouched.
    let allocs = dev.wait_allocs("bg", "the task to keep running", Duration::from_secs(5), |a| a.len() == 1);
    assert_eq!(status(&allocs[0]), "running");

    // A session ends when its task stops.
    let mut cli = Command::new(mlp())
        .args(["alloc", "exec", &id, "--", "sleep", "1004"])
        .env("MLP_ADDR", &dev.grpc)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mlp alloc exec");
    wait_for("the exec'd command to run", Duration::from_secs(30), || (!host_processes_with("sleep 1004").is_empty()).then_some(()));
    dev.ok(&["job", "stop", "bg"]);
    let code = wait_for("the session to end with its task", Duration::from_secs(30), || cli.try_wait().ok().flatten());
    assert!(!code.success(), "a session cut by its task's stop reports failure");
    assert!(host_processes_with("sleep 1004").is_empty());
    // A stopped allocation refuses new sessions.
    dev.wait_allocs("bg", "the allocation to stop", Duration::from_secs(30), |a| a.len() == 1 && status(&a[0]) != "running");
    let out = exec(&dev, &[&id, "--", "true"], b"");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("not running"), "{}", text(&out.stderr));
    wait_for("no task process left", Duration::from_secs(15), || processes_under(dev.dir.path()).is_empty().then_some(()));
}

#[test]
fn exec_runs_beside_a_raw_exec_task() {
    let dev = Dev::start();
    let id = start_job(&dev, "raw", "raw_exec", "echo raw-task > marker; exec sleep 3600");
    let local = dev.data_dir().join("agent/allocs").join(&id).join("main/local");
    let local = std::fs::canonicalize(&local).unwrap_or(local);
    assert_eq!(exec_ok(&dev, &[&id, "--", "pwd"]).trim(), local.to_string_lossy());
    assert_eq!(exec_until(&dev, &[&id, "--", "cat", "marker"], "raw-task"), "raw-task");
    assert_eq!(exec_ok(&dev, &[&id, "--", "sh", "-c", "echo $MLP_ALLOC_ID"]).trim(), id);
    let out = exec(&dev, &[&id, "--", "sh", "-c", "cat; exit 3"], b"piped\n");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "piped\n");
    let out = exec_ok(&dev, &["-t", &id, "--", "sh", "-c", "test -t 0 && echo is-a-tty"]);
    assert!(out.contains("is-a-tty"), "{out:?}");

    // A group of two tasks: the task must be named.
    let body = r#"job "pair" {
  type = "service"
  group "grp" {
    task "a" {
      driver = "raw_exec"
      config {
        command = "/bin/sh"
        args    = ["-c", "echo task-a > who; exec sleep 3600"]
      }
    }
    task "b" {
      driver = "raw_exec"
      config {
        command = "/bin/sh"
        args    = ["-c", "echo task-b > who; exec sleep 3600"]
      }
    }
  }
}
"#;
    let file = dev.write_job("pair.hcl", body);
    dev.ok(&["job", "run", "--detach", file.to_str().unwrap_or_default()]);
    let allocs = dev.wait_allocs("pair", "both tasks to run", Duration::from_secs(60), |a| a.len() == 1 && status(&a[0]) == "running");
    let pair = allocs[0]["id"].as_str().unwrap_or_default().to_string();
    let out = exec(&dev, &[&pair, "--", "true"], b"");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("has 2 tasks; name one of: a, b"), "{}", text(&out.stderr));
    assert_eq!(exec_until(&dev, &["--task", "b", &pair, "--", "cat", "who"], "task-b"), "task-b");
    assert_eq!(exec_until(&dev, &["--task", "a", &pair, "--", "cat", "who"], "task-a"), "task-a");
}

/// A pseudo-terminal pair opened by the test, standing in for the user's terminal.
struct Pty {
    master: std::os::fd::OwnedFd,
    slave: std::os::fd::OwnedFd,
}

impl Pty {
    fn open(rows: u16, cols: u16) -> Pty {
        use std::os::fd::FromRawFd;
        // SAFETY: posix_openpt takes flags only and returns a new descriptor or -1.
        let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        assert!(m >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        // SAFETY: `m` was just returned by posix_openpt and is owned by nothing else.
        let master = unsafe { std::os::fd::OwnedFd::from_raw_fd(m) };
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: `m` is a pty master; ptsname_r writes a NUL-terminated path into `name`.
        let ok = unsafe { libc::grantpt(m) == 0 && libc::unlockpt(m) == 0 && libc::ptsname_r(m, name.as_mut_ptr(), name.len()) == 0 };
        assert!(ok, "pty setup: {}", std::io::Error::last_os_error());
        // SAFETY: `name` holds the NUL-terminated path ptsname_r wrote.
        let s = unsafe { libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        assert!(s >= 0, "open slave: {}", std::io::Error::last_os_error());
        // SAFETY: open just returned this descriptor.
        let slave = unsafe { std::os::fd::OwnedFd::from_raw_fd(s) };
        let pty = Pty { master, slave };
        pty.resize(rows, cols);
        pty
    }

    /// Sets the size; the kernel sends SIGWINCH to the terminal's foreground process group.
    fn resize(&self, rows: u16, cols: u16) {
        use std::os::fd::AsRawFd;
        let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives across the call.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(rc, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }

    fn lflag(&self) -> libc::tcflag_t {
        use std::os::fd::AsRawFd;
        // SAFETY: termios is plain data; tcgetattr overwrites it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios into the pointer, which lives across the call.
        let rc = unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut t) };
        assert_eq!(rc, 0);
        t.c_lflag
    }

    fn write(&self, data: &[u8]) {
        use std::os::fd::AsRawFd;
        // SAFETY: writes from a live buffer of the given length.
        let n = unsafe { libc::write(self.master.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        assert_eq!(n, data.len() as isize);
    }

    /// Everything the terminal shows, collected by a thread.
    fn reader(&self) -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
        use std::io::Read;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut master = std::fs::File::from(self.master.try_clone().expect("dup master"));
        let out = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().expect("lock").extend_from_slice(&buf[..n]);
            }
        });
        seen
    }
}

#[test]
fn exec_tty_follows_the_local_terminal() {
    if !common::require_exec() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let dev = Dev::start();
    let id = start_job(&dev, "term", "exec", "exec sleep 3600");
    let pty = Pty::open(30, 100);
    assert_ne!(pty.lflag() & libc::ICANON, 0);
    let seen = pty.reader();
    let slave = |pty: &Pty| Stdio::from(pty.slave.try_clone().expect("dup slave"));
    let mut cmd = Command::new(mlp());
    cmd.args(["alloc", "exec", "-t", &id, "--", "sh", "-c"])
        .arg("stty size; while read x; do [ \"$x\" = q ] && exit 5; stty size; done")
        .env("MLP_ADDR", &dev.grpc)
        .stdin(slave(&pty))
        .stdout(slave(&pty))
        .stderr(slave(&pty));
    // SAFETY: runs in the forked child before exec: setsid(2) and ioctl(2) only, so the CLI
    // gets the test's terminal as its controlling terminal (and its SIGWINCH).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 || libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut cli = cmd.spawn().expect("run mlp alloc exec -t");
    let shows = |what: &str| String::from_utf8_lossy(&seen.lock().expect("lock")).contains(what);
    // The command's terminal starts with the local terminal's size.
    wait_for("the initial size inside", Duration::from_secs(30), || shows("30 100").then_some(()));
    // The local terminal is in raw mode while the session runs.
    assert_eq!(pty.lflag() & (libc::ICANON | libc::ECHO), 0, "not in raw mode");
    // Resizing the local terminal resizes the command's.
    pty.resize(40, 120);
    wait_for("the new size inside", Duration::from_secs(30), || {
        pty.write(b"\r");
        std::thread::sleep(Duration::from_millis(100));
        shows("40 120").then_some(())
    });
    // Typed input reaches the command; its exit code is the CLI's; the terminal is restored.
    pty.write(b"q\r");
    let code = wait_for("the CLI to exit", Duration::from_secs(30), || cli.try_wait().ok().flatten());
    assert_eq!(code.code(), Some(5), "terminal showed: {:?}", String::from_utf8_lossy(&seen.lock().expect("lock")));
    assert_ne!(pty.lflag() & libc::ICANON, 0, "the terminal was left in raw mode");
    assert_ne!(pty.lflag() & libc::ECHO, 0, "the terminal was left without echo");
}
