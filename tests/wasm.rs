//! The `wasm` driver end to end: `mlp dev` and the CLI run jobs whose module (WAT compiled by
//! the `wat` crate) the test writes to a host path. No root or cgroups needed: the module runs
//! in the agent's wasm sandbox.

mod common;

use std::time::Duration;

use common::{wait_for, Dev};

/// Writes its argv and its environment to stdout as WASI hands them over (NUL-separated), then
/// exits with the digit its first argument starts with.
const HELLO: &str = r#"(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func $write (param $ptr i32) (param $len i32)
    (i32.store (i32.const 16) (local.get $ptr))
    (i32.store (i32.const 20) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24))))
  (func (export "_start")
    (drop (call $args_sizes_get (i32.const 0) (i32.const 4)))
    (drop (call $args_get (i32.const 1024) (i32.const 8192)))
    (call $write (i32.const 8192) (i32.load (i32.const 4)))
    (drop (call $environ_sizes_get (i32.const 0) (i32.const 4)))
    (drop (call $environ_get (i32.const 4096) (i32.const 16384)))
    (call $write (i32.const 16384) (i32.load (i32.const 4)))
    ;; exit code: the first byte of argv[1] minus '0'
    (call $proc_exit (i32.sub (i32.load8_u (i32.load (i32.const 1028))) (i32.const 48)))))"#;

fn job(name: &str, module: &str, code: u32) -> String {
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
    task "hello" {{
      driver = "wasm"
      config {{
        module = "{module}"
        args   = ["{code}", "second arg"]
        env    = {{ GREETING = "hi from the config" }}
      }}
      env {{
        FROM_TASK = "task env"
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
fn wasm_job_runs_from_the_cli_with_logs_exit_code_and_cache() {
    let dev = Dev::start();
    let module = dev.dir.path().join("hello.wasm");
    std::fs::write(&module, wat::parse_str(HELLO).expect("valid WAT")).expect("write module");
    let module = module.to_str().expect("utf-8 path").to_string();

    // The node offers the driver.
    let nodes = dev.json(&["node", "status", "--json"]);
    let node = &nodes[0];
    assert!(node["drivers"].as_array().is_some_and(|d| d.iter().any(|d| d == "wasm")), "{node}");

    for (name, code) in [("wasm-zero", 0), ("wasm-three", 3)] {
        let file = dev.write_job(&format!("{name}.hcl"), &job(name, &module, code));
        let out = dev.cli(&["job", "run", "--wait", file.to_str().unwrap_or_default()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(code as i32),
            "`mlp job run --wait` exits with the module's code\nstdout: {stdout}\nstderr: {}\ndev log: {}",
            String::from_utf8_lossy(&out.stderr),
            common::tail(&dev.log(), 3000)
        );
        let allocs = dev.job(name)["allocations"].as_array().cloned().unwrap_or_default();
        let id = allocs[0]["id"].as_str().unwrap_or_default().to_string();
        let logs = dev.ok(&["alloc", "logs", &id]);
        assert!(logs.starts_with(&format!("hello.wasm\0{code}\0second arg\0")), "{logs:?}");
        for want in ["GREETING=hi from the config", "FROM_TASK=task env", &format!("MLP_JOB_NAME={name}")] {
            assert!(logs.split('\0').any(|e| e == want), "{want} not in {logs:?}");
        }
    }

    // Both runs had the same bytes: compiled once, cached on disk in the agent's data dir.
    let cache = dev.data_dir().join("agent").join("wasm-cache");
    let files = wait_for("the module cache", Duration::from_secs(5), || {
        let n = std::fs::read_dir(&cache).ok()?.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".cwasm")).count();
        (n > 0).then_some(n)
    });
    assert_eq!(files, 1);
}

/// Sleeps in a host call, forever (a service that never ends by itself).
const SLEEP_FOREVER: &str = r#"(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 3600000000000))
    (loop $l
      (drop (call $poll_oneoff (i32.const 0) (i32.const 256) (i32.const 1) (i32.const 512)))
      (br $l))))"#;

#[test]
fn a_running_wasm_task_is_restarted_after_an_agent_crash() {
    let mut dev = Dev::start_split();
    let module = dev.dir.path().join("sleep.wasm");
    std::fs::write(&module, wat::parse_str(SLEEP_FOREVER).expect("valid WAT")).expect("write module");
    let file = dev.write_job(
        "svc.hcl",
        &format!(
            "job \"svc\" {{\n  type = \"service\"\n  group \"g\" {{\n    task \"t\" {{\n      driver = \"wasm\"\n      config {{\n        module = \"{}\"\n      }}\n    }}\n  }}\n}}\n",
            module.display()
        ),
    );
    dev.ok(&["job", "run", "--detach", file.to_str().unwrap_or_default()]);
    let running = |a: &serde_json::Value| common::status(a) == "running" && a["task_states"]["t"]["state"] == "running";
    let allocs = dev.wait_allocs("svc", "the wasm task running", Duration::from_secs(30), |a| a.len() == 1 && running(&a[0]));

    // `mlp alloc exec` has no process to enter, and says so.
    let id = allocs[0]["id"].as_str().unwrap_or_default();
    let out = dev.cli(&["alloc", "exec", id, "--", "/bin/true"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("has no process to enter"), "{stderr}");

    // The task lived in the agent: it dies with it, and the next agent starts it again.
    dev.kill9_agent().expect("the agent ran");
    dev.spawn_agent();
    let allocs = dev.wait_allocs("svc", "the wasm task restarted", Duration::from_secs(60), |a| {
        a.len() == 1
            && running(&a[0])
            && a[0]["task_states"]["t"]["events"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["message"] == "agent restarted; task restarted"))
    });
    let events: Vec<&str> =
        allocs[0]["task_states"]["t"]["events"].as_array().into_iter().flatten().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(events.iter().filter(|e| **e == "started").count(), 2, "{events:?}");
    dev.ok(&["job", "stop", "svc"]);
}
