//! Host volumes end to end (issue 15 §4): an agent configured with `host_volume` blocks, jobs
//! whose groups ask for them (`volume`) and whose tasks mount them (`volume_mount`).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{field, logs, status, Dev};
use serde_json::Value;

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Host directories `datasets` (read-only in the agent's configuration, holding hello.txt)
/// and `scratch` (read-write), both open to the task's user, and the configuration file.
struct Volumes {
    dir: tempfile::TempDir,
}

impl Volumes {
    fn new() -> Volumes {
        let dir = tempfile::Builder::new().prefix("mlp-hostvol-").tempdir().expect("tempdir");
        let (datasets, scratch) = (dir.path().join("datasets"), dir.path().join("scratch"));
        std::fs::create_dir_all(&datasets).expect("mkdir");
        std::fs::create_dir_all(&scratch).expect("mkdir");
        std::fs::write(datasets.join("hello.txt"), "hello from the host\n").expect("write");
        chmod(&datasets.join("hello.txt"), 0o644);
        // World-writable: only the mount can stop a write to it.
        chmod(&datasets, 0o777);
        chmod(&scratch, 0o777);
        chmod(dir.path(), 0o755);
        let config = format!(
            "client {{\n  host_volume \"datasets\" {{\n    path      = \"{}\"\n    read_only = true\n  }}\n  host_volume \"scratch\" {{\n    path = \"{}\"\n  }}\n}}\n",
            datasets.display(),
            scratch.display()
        );
        std::fs::write(dir.path().join("agent.hcl"), config).expect("write config");
        Volumes { dir }
    }

    fn config(&self) -> String {
        self.dir.path().join("agent.hcl").to_string_lossy().into_owned()
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// A batch job of one task that runs `script` with `driver`, the group's volumes `data`
/// (datasets, read-only) and `scratch`, mounted at /data and /scratch; no restarts.
fn job(name: &str, driver: &str, script: &str) -> String {
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
    volume "data" {{
      type      = "host"
      source    = "datasets"
      read_only = true
    }}
    volume "scratch" {{
      type   = "host"
      source = "scratch"
    }}
    task "t" {{
      driver = "{driver}"
      config {{
        command = "/bin/sh"
        args    = ["-c", "{script}"]
      }}
      volume_mount {{
        volume      = "data"
        destination = "/data"
        read_only   = true
      }}
      volume_mount {{
        volume      = "scratch"
        destination = "/scratch"
      }}
    }}
  }}
}}
"#
    )
}

fn finished(dev: &Dev, job: &str) -> Value {
    let allocs = dev.wait_allocs(job, "the task to finish", Duration::from_secs(60), |a| {
        a.len() == 1 && matches!(status(&a[0]), "complete" | "failed")
    });
    allocs[0].clone()
}

#[test]
fn an_exec_task_reads_a_read_only_host_volume_cannot_write_it_and_writes_a_read_write_one() {
    if !common::require_exec() {
        return;
    }
    let vols = Volumes::new();
    let dev = Dev::start_with(&["--config", &vols.config()]);
    // The node advertises its volumes.
    let nodes = dev.json(&["node", "status", "--json"]);
    assert_eq!(nodes[0]["attributes"]["host_volume.datasets"], "ro", "{}", nodes[0]["attributes"]);
    assert_eq!(nodes[0]["attributes"]["host_volume.scratch"], "rw", "{}", nodes[0]["attributes"]);

    // Reads the read-only volume, writes the read-write one, then tries to write the read-only
    // one: that last write fails, and so does the task (its exit code is the write's).
    let script = "echo content=$(cat /data/hello.txt); echo from-task > /scratch/out && echo scratch=written; echo x > /data/new";
    let file = dev.write_job("exec.hcl", &job("vol-exec", "exec", script));
    dev.ok(&["job", "run", "--detach", file.to_str().unwrap_or_default()]);
    let a = finished(&dev, "vol-exec");
    let id = a["id"].as_str().unwrap_or_default().to_string();
    let (out, err) = (logs(&dev, &id, "t", false), logs(&dev, &id, "t", true));
    assert_eq!(field(&out, "content"), "hello from the host", "stdout:\n{out}\nstderr:\n{err}\nstate: {a}");
    assert_eq!(field(&out, "scratch"), "written", "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(status(&a), "failed", "the write to the read-only volume did not fail the task: {a}");
    assert!(err.contains("Read-only file system"), "stderr:\n{err}");
    let exit = a["task_states"]["t"]["exit_code"].as_i64();
    assert!(exit.is_some_and(|c| c != 0), "exit code {exit:?}: {a}");
    assert!(!vols.path("datasets").join("new").exists(), "the read-only volume was written on the host");
    assert_eq!(std::fs::read_to_string(vols.path("scratch").join("out")).unwrap_or_default(), "from-task\n");

    // raw_exec has no root to mount into: as in Nomad it mounts nothing, and the task is told
    // where its volumes are on the host.
    let script = "echo data=$MLP_VOLUME_data; echo scratch=$MLP_VOLUME_scratch; cat $MLP_VOLUME_data/hello.txt";
    let file = dev.write_job("raw.hcl", &job("vol-raw", "raw_exec", script));
    dev.ok(&["job", "run", "--detach", file.to_str().unwrap_or_default()]);
    let a = finished(&dev, "vol-raw");
    let id = a["id"].as_str().unwrap_or_default().to_string();
    let out = logs(&dev, &id, "t", false);
    assert_eq!(status(&a), "complete", "stdout:\n{out}\nstate: {a}");
    assert_eq!(field(&out, "data"), vols.path("datasets").to_string_lossy(), "{out}");
    assert_eq!(field(&out, "scratch"), vols.path("scratch").to_string_lossy(), "{out}");
    assert!(out.contains("hello from the host"), "{out}");
}

#[test]
fn a_job_asking_for_a_volume_no_node_offers_is_not_placed_and_the_reason_names_it() {
    let vols = Volumes::new();
    let dev = Dev::start_with(&["--config", &vols.config()]);
    let unknown = job("vol-unknown", "raw_exec", "true").replace("source    = \"datasets\"", "source    = \"nowhere\"");
    let file = dev.write_job("unknown.hcl", &unknown);
    // Without --detach, `job run` returns once the evaluation is done (here: blocked).
    let out = dev.cli(&["job", "run", file.to_str().unwrap_or_default()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Constraint \"missing host volume \"nowhere\"\" filtered 1 node"), "{text}");
    let shown = dev.ok(&["job", "status", "vol-unknown"]);
    assert!(shown.contains("missing host volume \"nowhere\""), "{shown}");
    assert_eq!(dev.job("vol-unknown")["allocations"].as_array().map(Vec::len), Some(0));

    // Read-write of the volume the agent offers read-only: no node either, and it says why.
    let rw =
        job("vol-rw", "raw_exec", "true").replace("      read_only = true\n    }", "    }").replace("        read_only   = true\n", "");
    let file = dev.write_job("rw.hcl", &rw);
    let out = dev.cli(&["job", "run", file.to_str().unwrap_or_default()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("host volume \"datasets\" is read-only (volume \"data\" is mounted read-write)"), "{text}");

    // An invalid spec is refused before it reaches the scheduler, with its position.
    let bad = job("vol-bad", "exec", "true").replace("destination = \"/data\"", "destination = \"data\"");
    let file = dev.write_job("bad.hcl", &bad);
    let out = dev.cli(&["job", "run", file.to_str().unwrap_or_default()]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("bad.hcl:29:23: job.vol-bad.group.g.task.t.volume_mount[0].destination: \"data\" must be an absolute path"),
        "{text}"
    );

    // The JSON door obeys the same rules, and takes a good job with volumes.
    let task = r#"{"name": "t", "driver": "raw_exec", "config": {"command": "true"}, "volume_mounts": [MOUNT]}"#;
    let body = |mount: &str| {
        format!(
            r#"{{"job": {{"name": "vol-json", "type": "batch", "groups": [{{"name": "g", "volumes": [{{"name": "data", "type": "host", "source": "scratch"}}], "tasks": [{task}]}}]}}}}"#,
            task = task.replace("MOUNT", mount)
        )
    };
    let json = Some("application/json");
    let (code, text) = dev.http("POST", "/v1/jobs", json, body(r#"{"volume": "date", "destination": "/data"}"#).as_bytes());
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("job.vol-json.group.g.task.t.volume_mount[0].volume: no volume labelled"), "{text}");
    let (code, text) = dev.http("POST", "/v1/jobs", json, body(r#"{"volume": "data", "destination": "/data"}"#).as_bytes());
    assert_eq!(code, 200, "{text}");
    let shown = dev.job("vol-json");
    assert_eq!(shown["job"]["groups"][0]["volumes"][0]["source"], "scratch", "{shown}");
}
