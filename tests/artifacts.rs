//! `artifact` blocks end to end (issue 14 §3): `mlp dev` and the CLI run a job whose task reads
//! what its artifacts put in its task dir: a tar.gz from a loopback HTTP server (Python's
//! `http.server`), unpacked and checked against its sha256, and a file from a `file://` root the
//! agent allows. A wrong checksum fails the task before it starts, with the reason in its events.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{wait_for, Dev};
use sha2::Digest;

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn job(name: &str, url: &str, checksum: &str, file_src: &str) -> String {
    format!(
        r#"job "{name}" {{
  type = "batch"
  group "g" {{
    restart {{
      attempts = 0
      mode     = "fail"
    }}
    reschedule {{
      attempts  = 0
      unlimited = false
    }}
    task "read" {{
      driver = "raw_exec"
      artifact {{
        source      = "{url}"
        destination = "local/in"
        options {{
          checksum = "{checksum}"
        }}
      }}
      artifact {{
        source      = "{file_src}"
        destination = "local/cfg.txt"
        mode        = "file"
      }}
      config {{
        command = "/bin/sh"
        args    = ["-c", "cat $MLP_TASK_DIR/in/data/hello.txt $MLP_TASK_DIR/cfg.txt"]
      }}
      resources {{
        cpu    = 100
        memory = 32
      }}
    }}
  }}
}}
"#
    )
}

#[test]
fn a_task_reads_its_artifacts_and_a_bad_checksum_stops_it() {
    let root = tempfile::tempdir().expect("tempdir");
    let site = root.path().join("site");
    std::fs::create_dir_all(site.join("data")).expect("site");
    std::fs::write(site.join("data/hello.txt"), "hello from the archive\n").expect("file");
    let st = Command::new("tar").args(["czf", "site/data.tar.gz", "-C", "site", "data"]).current_dir(root.path()).status();
    assert!(st.is_ok_and(|s| s.success()), "tar czf (GNU tar) is needed");
    let archive = std::fs::read(site.join("data.tar.gz")).expect("archive");
    let sum: String = sha2::Sha256::digest(&archive).iter().map(|b| format!("{b:02x}")).collect();
    let files = root.path().join("files");
    std::fs::create_dir_all(&files).expect("files");
    std::fs::write(files.join("cfg.txt"), "lr=0.1\n").expect("cfg");

    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port");
    let _serve = Serve(
        Command::new("/usr/bin/python3")
            .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"])
            .arg(&site)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m http.server (apt-get install python3)"),
    );
    let url = format!("http://127.0.0.1:{port}/data.tar.gz");
    wait_for("the HTTP server", Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).ok());

    let file_root = files.to_str().expect("utf-8").to_string();
    let dev = Dev::start_with(&["--artifact-file-root", &file_root]);
    let file_src = format!("file://{}", files.join("cfg.txt").display());
    let f = dev.write_job("good.hcl", &job("good", &url, &format!("sha256:{sum}"), &file_src));
    let out = dev.cli(&["job", "run", "--wait", f.to_str().unwrap_or_default()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        common::tail(&dev.log(), 3000)
    );
    let id = dev.job("good")["allocations"][0]["id"].as_str().unwrap_or_default().to_string();
    let logs = dev.ok(&["alloc", "logs", &id]);
    assert_eq!(logs, "hello from the archive\nlr=0.1\n");
    let status = dev.ok(&["alloc", "status", &id]);
    assert!(status.contains("artifact") && status.contains("fetched"), "the fetch is in the task's events:\n{status}");

    let wrong = format!("sha256:{}", "0".repeat(64));
    let f = dev.write_job("bad.hcl", &job("bad", &url, &wrong, &file_src));
    let out = dev.cli(&["job", "run", "--wait", f.to_str().unwrap_or_default()]);
    assert_ne!(out.status.code(), Some(0), "a wrong checksum must fail the job");
    let id = dev.job("bad")["allocations"][0]["id"].as_str().unwrap_or_default().to_string();
    let status = dev.ok(&["alloc", "status", &id]);
    assert!(status.contains("checksum mismatch") && status.contains(&sum), "{status}");

    // A file:// source outside the allowed root is refused the same way.
    let f = dev.write_job("outside.hcl", &job("outside", &url, &format!("sha256:{sum}"), "file:///etc/hostname"));
    let out = dev.cli(&["job", "run", "--wait", f.to_str().unwrap_or_default()]);
    assert_ne!(out.status.code(), Some(0));
    let id = dev.job("outside")["allocations"][0]["id"].as_str().unwrap_or_default().to_string();
    assert!(dev.ok(&["alloc", "status", &id]).contains("not under the agent's --artifact-file-root"));
}
