//! Job spec parsing: good files decode to the expected `Job`, bad ones produce exact,
//! positioned diagnostics (snapshot-tested; review `snapshots/` when they change).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use mlp_proto::jobspec::{parse_duration, parse_file, parse_str, validate_job, JobspecError};
use mlp_proto::v1::{Affinity, GpuRequest, Job, RestartPolicy, Spread, SpreadTarget};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name)
}

/// Parses `src` and returns the full error text; panics if it parses.
fn errors(src: &str) -> String {
    match parse_str(src, "test.hcl") {
        Ok(job) => panic!("expected errors, got {job:#?}"),
        Err(err) => err.to_string(),
    }
}

/// A minimal valid job with `task_body` as the body of its only task.
fn with_task(task_body: &str) -> String {
    format!("job \"j\" {{\n  group \"g\" {{\n    task \"t\" {{\n{task_body}    }}\n  }}\n}}\n")
}

const TASK_OK: &str = "      driver = \"exec\"\n      config {\n        command = \"/bin/true\"\n      }\n";

// ---- bad files ----------------------------------------------------------------------------

/// (snapshot name, source). Each must fail; the snapshot holds the exact error text.
fn bad_cases() -> Vec<(&'static str, String)> {
    vec![
        ("syntax_error", "job \"j\" {\n  type = \n}\n".to_string()),
        (
            "syntax_one_line_block_with_two_attributes",
            "job \"j\" {\n  meta { a = \"1\"  b = \"2\" }\n}\n".to_string(),
        ),
        (
            "duplicate_attribute",
            "job \"j\" {\n  type = \"batch\"\n  type = \"service\"\n}\n".to_string(),
        ),
        (
            "unknown_field_with_suggestion",
            with_task(&format!("{TASK_OK}      resources {{\n        memroy = 256\n      }}\n")),
        ),
        (
            "unknown_field_without_suggestion",
            with_task(&format!("{TASK_OK}      template {{\n        data = \"x\"\n      }}\n")),
        ),
        (
            "artifact_bad_source",
            with_task(&format!("{TASK_OK}      artifact {{\n        source = \"x\"\n      }}\n")),
        ),
        (
            "artifact_escaping_destination",
            with_task(&format!(
                "{TASK_OK}      artifact {{\n        source      = \"https://h/m.tar.gz\"\n        destination = \"../../etc\"\n      }}\n"
            )),
        ),
        (
            "wrong_type",
            with_task(&format!("{TASK_OK}      resources {{\n        memory = \"lots\"\n      }}\n")),
        ),
        (
            "not_an_integer",
            "job \"j\" {\n  group \"g\" {\n    count = 1.5\n    task \"t\" {\n      driver = \"exec\"\n      config {\n        command = \"x\"\n      }\n    }\n  }\n}\n".to_string(),
        ),
        (
            "negative_number",
            with_task(&format!("{TASK_OK}      resources {{\n        cpu = -5\n      }}\n")),
        ),
        (
            "missing_driver",
            with_task("      config {\n        command = \"/bin/true\"\n      }\n"),
        ),
        ("missing_config", with_task("      driver = \"exec\"\n")),
        ("wasm_missing_module", with_task("      driver = \"wasm\"\n      config {\n        args = [\"a\"]\n      }\n")),
        (
            "wasm_config_invalid",
            with_task(
                "      driver = \"wasm\"\n      config {\n        command = \"/bin/true\"\n        module = \"local/../../x.wasm\"\n        env = { \"A=B\" = \"c\" }\n      }\n      network {\n        mode = \"host\"\n      }\n",
            ),
        ),
        ("oci_missing_image", with_task("      driver = \"oci\"\n      config {\n        args = [\"a\"]\n      }\n")),
        (
            "oci_config_invalid",
            with_task(
                "      driver = \"oci\"\n      config {\n        image = \"Registry.example:5000/Team/x:bad tag\"\n        work_dir = \"relative/dir\"\n        module = \"m.wasm\"\n        auth {\n          password = \"hunter2\"\n        }\n      }\n",
            ),
        ),
        (
            "oci_bad_digest",
            with_task("      driver = \"oci\"\n      config {\n        image = \"r:5000/x@sha256:abc\"\n      }\n"),
        ),
        (
            "oci_fields_on_exec",
            with_task(
                "      driver = \"exec\"\n      config {\n        command = \"/bin/true\"\n        image = \"busybox:1\"\n        entrypoint = [\"sh\"]\n      }\n",
            ),
        ),
        (
            "wasm_fields_on_exec",
            with_task("      driver = \"exec\"\n      config {\n        command = \"/bin/true\"\n        module = \"app.wasm\"\n        env = { A = \"b\" }\n      }\n"),
        ),
        (
            "empty_command",
            with_task("      driver = \"exec\"\n      config {\n        command = \"\"\n      }\n"),
        ),
        (
            "unknown_driver",
            with_task("      driver = \"docker\"\n      config {\n        command = \"x\"\n      }\n"),
        ),
        (
            "bad_duration",
            with_task(&format!("{TASK_OK}      kill_timeout = \"5 parsecs\"\n")),
        ),
        (
            "duration_not_a_string",
            with_task(&format!("{TASK_OK}      max_run_duration = 60\n")),
        ),
        (
            "kill_timeout_too_long",
            with_task(&format!("{TASK_OK}      kill_timeout = \"2h\"\n")),
        ),
        (
            "duplicate_task_names",
            format!("job \"j\" {{\n  group \"g\" {{\n    task \"t\" {{\n{TASK_OK}    }}\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n}}\n"),
        ),
        (
            "duplicate_group_names",
            format!("job \"j\" {{\n  group \"g\" {{\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n  group \"g\" {{\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n}}\n"),
        ),
        (
            "duplicate_block",
            with_task(&format!("{TASK_OK}      resources {{\n        cpu = 100\n      }}\n      resources {{\n        cpu = 200\n      }}\n")),
        ),
        (
            "priority_out_of_range",
            format!("job \"j\" {{\n  priority = 150\n  group \"g\" {{\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n}}\n"),
        ),
        (
            "count_too_large",
            format!("job \"j\" {{\n  group \"g\" {{\n    count = 20000\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n}}\n"),
        ),
        (
            "memory_zero",
            with_task(&format!("{TASK_OK}      resources {{\n        memory = 0\n      }}\n")),
        ),
        (
            "unknown_job_type",
            format!("job \"j\" {{\n  type = \"cron\"\n  group \"g\" {{\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n}}\n"),
        ),
        (
            "bad_namespace",
            format!("job \"j\" {{\n  namespace = \"Team_A\"\n  group \"g\" {{\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n}}\n"),
        ),
        (
            "bad_restart_mode",
            format!("job \"j\" {{\n  group \"g\" {{\n    restart {{\n      mode = \"retry\"\n    }}\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n}}\n"),
        ),
        (
            "invalid_names",
            format!("job \"my job\" {{\n  group \"g\" {{\n    task \"a/b\" {{\n{TASK_OK}    }}\n  }}\n}}\n"),
        ),
        ("missing_job_label", "job {\n}\n".to_string()),
        (
            "missing_task_label",
            format!("job \"j\" {{\n  group \"g\" {{\n    task {{\n{TASK_OK}    }}\n  }}\n}}\n"),
        ),
        ("no_group", "job \"j\" {\n  type = \"batch\"\n}\n".to_string()),
        ("no_task", "job \"j\" {\n  group \"g\" {\n    count = 2\n  }\n}\n".to_string()),
        ("no_job", "# nothing here\n".to_string()),
        (
            "two_jobs",
            format!("job \"a\" {{\n  group \"g\" {{\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n}}\n\njob \"b\" {{\n}}\n"),
        ),
        (
            "expression_not_supported",
            with_task("      driver = var.driver\n      config {\n        command = \"${local.cmd}\"\n        args    = [upper(\"x\")]\n      }\n"),
        ),
        (
            "wrong_form",
            with_task("      driver {\n      }\n      config = { command = \"x\" }\n      env = [\"A=1\"]\n"),
        ),
        (
            "bad_constraints",
            format!("job \"j\" {{\n  constraint {{\n    attribute = \"${{attr.kernel.name}}\"\n    operator  = \"~\"\n    value     = \"linux\"\n  }}\n  constraint {{\n    attribute = \"${{env.HOME}}\"\n  }}\n  constraint {{\n    operator = \"is_set\"\n  }}\n  group \"g\" {{\n    constraint {{\n      attribute = \"${{node.class}}\"\n    }}\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n}}\n"),
        ),
        (
            "gpu_and_labels",
            with_task(&format!("{TASK_OK}      resources \"big\" {{\n        gpu {{\n          count = \"two\"\n          model = \"a100\"\n        }}\n      }}\n")),
        ),
        (
            "isolation_fields",
            with_task(&format!("{TASK_OK}      user = 7\n      network {{\n        mode = \"bridge\"\n      }}\n      resources {{\n        memory         = 256\n        memory_max     = 128\n        cpu_hard_limit = \"yes\"\n      }}\n")),
        ),
        (
            "gpu_share_invalid",
            with_task(&format!("{TASK_OK}      resources {{\n        gpu {{\n          count  = 2\n          share  = 0.25\n          model  = [\"V100M16\", 3]\n          memory = -1\n        }}\n      }}\n    }}\n    task \"u\" {{\n{TASK_OK}      resources {{\n        gpu {{\n          share = 1.5\n        }}\n      }}\n    }}\n    task \"v\" {{\n{TASK_OK}      resources {{\n        gpu {{\n          share = 0.0005\n          shares = 1\n        }}\n      }}\n")),
        ),
        (
            "gang_fields_invalid",
            format!("job \"j\" {{\n  group \"a\" {{\n    count     = 0\n    gang      = true\n    min_count = 2\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n  group \"b\" {{\n    count         = 4\n    gang          = \"yes\"\n    gang_timeout  = \"soon\"\n    gang_topology = \"rack\"\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n  group \"c\" {{\n    gang_topology = \"${{meta.rack}}\"\n    gang_timeout  = \"10m\"\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n  group \"d\" {{\n    count        = 2\n    min_count    = 1\n    gang_timeout = \"800h\"\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n}}\n"),
        ),
        (
            "migrate_reschedule_invalid",
            format!("job \"j\" {{\n  group \"a\" {{\n    migrate {{\n      max_parallel = 0\n      max_paralel  = 2\n    }}\n    reschedule {{\n      attempts       = 3\n      interval       = \"0s\"\n      delay          = \"1m\"\n      delay_function = \"linear\"\n      max_delay      = \"10s\"\n      unlimited      = \"no\"\n    }}\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n}}\n"),
        ),
        (
            "affinity_spread_invalid",
            format!("job \"j\" {{\n  affinity {{\n    attribute = \"rack\"\n    operator  = \"~\"\n    weight    = 0\n  }}\n  spread {{\n    attribute = \"${{meta.rack}}\"\n    weight    = 101\n    target \"r1\" {{\n      percent = 70\n    }}\n    target \"r1\" {{\n      percent = 40\n    }}\n    target {{\n      percent = 120\n      share   = 1\n    }}\n  }}\n  group \"g\" {{\n    affinity {{\n      attribute = \"${{meta.rack}}\"\n      value     = \"r1\"\n      weight    = -150\n    }}\n    spread {{\n      weight = -1\n    }}\n    spread \"x\" {{\n      attribute = \"${{env.HOME}}\"\n      weight    = 0\n    }}\n    task \"t\" {{\n{TASK_OK}      affinity {{\n        attribute = \"${{attr.gpu.model}}\"\n        value     = \"H100\"\n        wieght    = 10\n      }}\n      affinity {{\n        attribute = \"${{node.pool}}\"\n        operator  = \"is_set\"\n        weight    = \"high\"\n      }}\n    }}\n  }}\n}}\n"),
        ),
        (
            "group_network_invalid",
            format!("job \"j\" {{\n  group \"a\" {{\n    network {{\n      mode = \"overlay\"\n      port \"http\" {{\n        to = 70000\n      }}\n      port \"http\" {{\n        static = 9000\n      }}\n      port \"1st\" {{\n        static = 9000\n        from   = 1\n      }}\n      port \"z\" {{\n        static = 0\n      }}\n    }}\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n  group \"b\" {{\n    network {{\n      mode = \"bridge\"\n    }}\n    task \"t\" {{\n{TASK_OK}      network {{\n        mode = \"none\"\n      }}\n    }}\n  }}\n  group \"c\" {{\n    network {{\n      mode = \"none\"\n      port \"p\" {{}}\n    }}\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n  group \"d\" {{\n    network {{\n      port \"p\" {{\n        to = 80\n      }}\n    }}\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n}}\n"),
        ),
        (
            "unknown_top_level",
            "variable \"x\" {\n}\n\nregion = \"eu\"\n".to_string(),
        ),
    ]
}

#[test]
fn bad_specs_report_positioned_errors() {
    let cases = bad_cases();
    assert!(cases.len() >= 15);
    for (name, src) in cases {
        insta::assert_snapshot!(name, errors(&src), &src);
    }
}

#[test]
fn multiple_errors_in_one_file_are_all_reported_in_order() {
    let path = fixture("bad/multiple_errors.hcl");
    let err = parse_file(&path).unwrap_err();
    let text = err.to_string().replace(&path.display().to_string(), "multiple_errors.hcl");
    insta::assert_snapshot!("multiple_errors_fixture", text);
    let positions: Vec<_> = err.diagnostics.iter().map(|d| (d.line, d.column)).collect();
    let mut sorted = positions.clone();
    sorted.sort();
    assert_eq!(positions, sorted, "diagnostics must be sorted by position");
    assert!(err.diagnostics.len() >= 8);
}

#[test]
fn diagnostics_carry_structured_fields() {
    let src = with_task(&format!("{TASK_OK}      resources {{\n        memory = 0\n      }}\n"));
    let err = parse_str(&src, "f.hcl").unwrap_err();
    let d = &err.diagnostics[0];
    assert_eq!(d.file.as_deref(), Some("f.hcl"));
    assert_eq!((d.line, d.column), (9, 18));
    assert_eq!(d.path, "job.j.group.g.task.t.resources.memory");
    // Without a file name the position stays, the file goes.
    let err = parse_str(&src, "").unwrap_err();
    assert!(err.to_string().starts_with("9:18: job.j.group.g.task.t.resources.memory: "));
}

#[test]
fn missing_file_is_an_error() {
    let err = parse_file(Path::new("/nonexistent/job.hcl")).unwrap_err();
    assert!(err.to_string().starts_with("/nonexistent/job.hcl: cannot read job spec"), "{err}");
}

// ---- good files ---------------------------------------------------------------------------

#[test]
fn minimal_job_gets_defaults() {
    let job = parse_str(&with_task(TASK_OK), "min.hcl").unwrap();
    assert_eq!(job.id, "j");
    assert_eq!(job.name, "j");
    assert_eq!(job.namespace, "default");
    assert_eq!(job.r#type, "service");
    assert_eq!(job.priority, 50);
    assert_eq!(job.version, 0);
    assert!(job.status.is_empty());
    let group = &job.groups[0];
    assert_eq!(group.count, Some(1));
    assert_eq!(group.restart, Some(RestartPolicy { attempts: 2, interval_ms: 30 * 60_000, delay_ms: 15_000, mode: "fail".into() }));
    let task = &group.tasks[0];
    assert_eq!(task.driver, "exec");
    assert_eq!(task.config.as_ref().unwrap().command, "/bin/true");
    assert!(task.config.as_ref().unwrap().args.is_empty());
    assert_eq!(task.kill_timeout_ms, 5_000);
    assert_eq!(task.max_run_duration_ms, 0);
    let res = task.resources.as_ref().unwrap();
    assert_eq!((res.cpu_mhz, res.memory_mib, res.cores, res.disk_mib), (100, 300, 0, 0));
    assert_eq!(res.gpu, None);
}

#[test]
fn batch_restart_defaults_fill_partial_blocks() {
    // `type` after the group: defaults must still follow it.
    let src = format!(
        "job \"j\" {{\n  group \"g\" {{\n    restart {{\n      attempts = 7\n    }}\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n  group \"h\" {{\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n  type = \"batch\"\n}}\n"
    );
    let job = parse_str(&src, "").unwrap();
    assert_eq!(
        job.groups[0].restart,
        Some(RestartPolicy { attempts: 7, interval_ms: 24 * 3_600_000, delay_ms: 15_000, mode: "fail".into() })
    );
    assert_eq!(job.groups[1].restart.as_ref().unwrap().attempts, 3);
}

#[test]
fn full_job_decodes_every_field() {
    let job = parse_file(&fixture("good/full.hcl")).unwrap();
    assert_eq!(job.r#type, "batch");
    assert_eq!(job.priority, 70);
    assert_eq!(job.namespace, "research-1");
    assert_eq!(job.meta.get("team").map(String::as_str), Some("vision"));

    assert_eq!(job.constraints.len(), 2);
    assert_eq!(job.constraints[0].attribute, "${attr.kernel.name}");
    assert_eq!(job.constraints[0].operator, "=");
    assert_eq!(job.constraints[0].value, "linux");
    assert_eq!(job.constraints[1].attribute, "${meta.rack}");
    assert_eq!(job.constraints[1].operator, "is_set");

    let group = &job.groups[0];
    assert_eq!(group.name, "workers");
    assert_eq!(group.count, Some(3));
    assert_eq!(group.constraints[0].attribute, "${node.datacenter}");
    assert_eq!(group.constraints[0].operator, "!=");
    assert_eq!(group.meta.get("stage").map(String::as_str), Some("pretrain"));
    assert_eq!(group.meta.get("shard-count").map(String::as_str), Some("8"));
    // Partial restart block: batch defaults for the rest.
    assert_eq!(group.restart, Some(RestartPolicy { attempts: 5, interval_ms: 86_400_000, delay_ms: 15_000, mode: "delay".into() }));

    let main = &group.tasks[0];
    assert_eq!(main.driver, "raw_exec");
    let config = main.config.as_ref().unwrap();
    assert_eq!(config.command, "/usr/bin/python3");
    assert_eq!(config.args, ["train.py", "--epochs", "10", "--dry-run=${DRY}"]);
    let env: Vec<_> = main.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(env, [("BATCH", "64"), ("LR", "0.001"), ("NAME", "resnet"), ("VERBOSE", "true")]);
    let res = main.resources.as_ref().unwrap();
    assert_eq!((res.cpu_mhz, res.cores, res.memory_mib, res.disk_mib), (2000, 2, 4096, 10240));
    assert_eq!(res.gpu, Some(GpuRequest { count: Some(2), ..Default::default() }));
    assert_eq!(main.kill_timeout_ms, 90_000);
    assert_eq!(main.max_run_duration_ms, 5_410_000);
    assert_eq!(main.meta.get("owner").map(String::as_str), Some("alice"));

    let sidecar = &group.tasks[1];
    let res = sidecar.resources.as_ref().unwrap();
    assert_eq!(res.gpu, Some(GpuRequest { count: Some(1), ..Default::default() }));
    // Defaults for the fields a partial resources block leaves out.
    assert_eq!((res.cpu_mhz, res.memory_mib), (100, 300));

    // What parses must also pass the JSON-side checks, and survive a JSON round trip.
    validate_job(&job).unwrap();
    let back: Job = serde_json::from_str(&serde_json::to_string(&job).unwrap()).unwrap();
    assert_eq!(back, job);
}

#[test]
fn example_train_parses() {
    let job = parse_file(&example("train.hcl")).unwrap();
    assert_eq!(job.name, "train");
    assert_eq!(job.r#type, "batch");
    let group = &job.groups[0];
    assert_eq!((group.name.as_str(), group.effective_count()), ("trainer", 1));
    assert_eq!(group.restart.as_ref().unwrap().attempts, 1);
    let task = &group.tasks[0];
    assert_eq!((task.name.as_str(), task.driver.as_str()), ("train", "exec"));
    let config = task.config.as_ref().unwrap();
    assert_eq!(config.command, "/bin/sh");
    assert_eq!(config.args[0], "-c");
    assert!(config.args[1].contains("training complete"), "{}", config.args[1]);
    assert!(config.args[1].contains("epoch $i/5 loss=$loss"));
    assert_eq!(task.env.get("LEARNING_RATE").map(String::as_str), Some("0.01"));
    let res = task.resources.as_ref().unwrap();
    assert_eq!((res.cpu_mhz, res.memory_mib), (500, 256));
}

#[test]
fn example_serve_parses() {
    let job = parse_file(&example("serve.hcl")).unwrap();
    assert_eq!(job.name, "serve");
    assert_eq!(job.r#type, "service");
    let group = &job.groups[0];
    assert_eq!((group.name.as_str(), group.effective_count()), ("api", 2));
    let task = &group.tasks[0];
    assert_eq!((task.name.as_str(), task.driver.as_str()), ("server", "exec"));
    assert_eq!(task.kill_timeout_ms, 5_000);
    let script = &task.config.as_ref().unwrap().args[1];
    assert!(script.starts_with("trap 'echo shutting down; exit 0' TERM\n"), "{script}");
    assert!(script.contains("$$"), "shell PID variable survives: {script}");
}

#[test]
fn example_scripts_run() {
    // The train example must print its epochs and exit 0.
    assert!(Path::new("/bin/sh").exists(), "this test needs /bin/sh (a POSIX shell; `apt-get install dash`)");
    let job = parse_file(&example("train.hcl")).unwrap();
    let task = &job.groups[0].tasks[0];
    let config = task.config.as_ref().unwrap();
    let out = std::process::Command::new(&config.command).args(&config.args).envs(&task.env).output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("epoch 1/5 loss=0.9000"), "{stdout}");
    assert!(stdout.contains("epoch 5/5 loss=0.1800"), "{stdout}");
    assert!(stdout.trim_end().ends_with("training complete"), "{stdout}");
}

// ---- validate_job (JSON path) -------------------------------------------------------------

#[test]
fn validate_job_reports_paths_without_positions() {
    let mut job = parse_str(&with_task(TASK_OK), "").unwrap();
    validate_job(&job).unwrap();
    job.priority = 0;
    job.groups[0].count = Some(10_001);
    job.groups[0].restart.as_mut().unwrap().mode = "never".into();
    let task = &mut job.groups[0].tasks[0];
    task.driver = "docker".into();
    task.config = None;
    task.resources.as_mut().unwrap().memory_mib = 0;
    task.kill_timeout_ms = 3_600_001;
    job.groups.push(job.groups[0].clone());
    let err: JobspecError = validate_job(&job).unwrap_err();
    assert!(err.diagnostics.iter().all(|d| d.line == 0 && d.column == 0 && d.file.is_none()));
    insta::assert_snapshot!("validate_job_errors", err.to_string());
}

#[test]
fn validate_job_accepts_a_json_job() {
    let json = r#"{
        "id": "web", "name": "web", "namespace": "default", "type": "service", "priority": 50,
        "groups": [{"name": "g", "count": 1,
            "tasks": [{"name": "t", "driver": "raw_exec", "config": {"command": "/bin/true"}}]}]
    }"#;
    let job: Job = serde_json::from_str(json).unwrap();
    validate_job(&job).unwrap();
    let empty = Job::default();
    insta::assert_snapshot!("validate_job_empty", validate_job(&empty).unwrap_err().to_string());
}

#[test]
fn parse_duration_is_public() {
    assert_eq!(parse_duration("1h30m10s").unwrap().as_secs(), 5410);
    assert!(parse_duration("-1s").is_err());
}

#[test]
fn isolation_fields_decode() {
    let src = with_task(&format!(
        "{TASK_OK}      user = \"app\"\n      network {{\n        mode = \"none\"\n      }}\n      resources {{\n        memory         = 256\n        memory_max     = 512\n        pids           = 64\n        cpu_hard_limit = true\n      }}\n"
    ));
    let job = parse_str(&src, "test.hcl").unwrap();
    let task = &job.groups[0].tasks[0];
    assert_eq!(task.user, "app");
    assert_eq!(task.network_mode, "none");
    let res = task.resources.clone().unwrap();
    assert_eq!((res.memory_mib, res.memory_max_mib, res.pids, res.cpu_hard_limit), (256, 512, 64, true));
}

#[test]
fn gpu_models_memory_and_share_decode() {
    let src = with_task(&format!(
        "{TASK_OK}      resources {{\n        gpu {{\n          model  = [\"V100M16\", \"V100M32\"]\n          memory = 16384\n          share  = 0.25\n        }}\n      }}\n"
    ));
    let job = parse_str(&src, "test.hcl").unwrap();
    let res = job.groups[0].tasks[0].resources.as_ref().unwrap();
    assert_eq!(
        res.gpu,
        Some(GpuRequest {
            count: Some(1),
            models: vec!["V100M16".into(), "V100M32".into()],
            memory_mib: 16384,
            share_milli: 250,
            mig_profile: String::new(),
        })
    );
    // One model as a plain string; whole GPUs leave share_milli at 0.
    let src = with_task(&format!(
        "{TASK_OK}      resources {{\n        gpu {{\n          count = 2\n          model = \"A100\"\n        }}\n      }}\n"
    ));
    let job = parse_str(&src, "test.hcl").unwrap();
    let gpu = job.groups[0].tasks[0].resources.as_ref().unwrap().gpu.clone().unwrap();
    assert_eq!((gpu.effective_count(), gpu.models, gpu.share_milli), (2, vec!["A100".to_string()], 0));
    // JSON submissions get the same rules.
    let mut bad = job.clone();
    if let Some(r) = bad.groups[0].tasks[0].resources.as_mut() {
        r.gpu = Some(GpuRequest { count: Some(2), share_milli: 500, ..Default::default() });
    }
    let err = validate_job(&bad).unwrap_err().to_string();
    assert!(err.contains("count must be 1"), "{err}");
    if let Some(r) = bad.groups[0].tasks[0].resources.as_mut() {
        r.gpu = Some(GpuRequest { count: Some(1), share_milli: 1000, ..Default::default() });
    }
    let err = validate_job(&bad).unwrap_err().to_string();
    assert!(err.contains("share_milli must be between 1 and 999"), "{err}");
    // A share's memory is what it reserves: written as 0 it is an error at its position; a
    // memory larger than any device is still a valid spec (it cannot be placed).
    let src = with_task(&format!(
        "{TASK_OK}      resources {{\n        gpu {{\n          share  = 0.5\n          memory = 0\n        }}\n      }}\n"
    ));
    let err = parse_str(&src, "test.hcl").unwrap_err().to_string();
    assert!(err.contains("resources.gpu.memory: a shared GPU's memory is the device memory it reserves"), "{err}");
    let src = with_task(&format!(
        "{TASK_OK}      resources {{\n        gpu {{\n          share  = 0.5\n          memory = 10000000\n        }}\n      }}\n"
    ));
    let gpu = parse_str(&src, "test.hcl").unwrap().groups[0].tasks[0].resources.clone().unwrap().gpu.unwrap();
    assert_eq!((gpu.share_milli, gpu.memory_mib), (500, 10_000_000));
}

#[test]
fn gang_fields_decode() {
    let src = format!("job \"j\" {{\n  type = \"batch\"\n  group \"workers\" {{\n    count         = 16\n    gang          = true\n    gang_topology = \"${{meta.rack}}\"\n    gang_timeout  = \"10m\"\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n  group \"elastic\" {{\n    count     = 8\n    min_count = 4\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n}}\n");
    let job = parse_str(&src, "gang.hcl").unwrap();
    let g = &job.groups[0];
    assert_eq!((g.effective_count(), g.gang, g.min_count), (16, true, 0));
    assert_eq!(g.gang_topology, "${meta.rack}");
    assert_eq!(g.gang_timeout_ms, 600_000);
    let e = &job.groups[1];
    assert_eq!((e.effective_count(), e.gang, e.min_count, e.gang_timeout_ms), (8, false, 4, 0));
    assert!(e.gang_topology.is_empty());
}

#[test]
fn group_network_decodes_nomad_shape() {
    let src = format!("job \"j\" {{\n  group \"g\" {{\n    network {{\n      mode = \"bridge\"\n      port \"http\" {{\n        to = 8080\n      }}\n      port \"metrics\" {{}}\n      port \"admin\" {{\n        static = 9000\n        to     = 9000\n      }}\n    }}\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n}}\n");
    let job = parse_str(&src, "net.hcl").unwrap();
    let network = job.groups[0].network.clone().unwrap();
    assert_eq!(network.mode, "bridge");
    let ports: Vec<_> = network.ports.iter().map(|p| (p.label.as_str(), p.static_port, p.to)).collect();
    assert_eq!(ports, [("http", 0, 8080), ("metrics", 0, 0), ("admin", 9000, 9000)]);
    // Host mode (the default) with a static port and no `to`.
    let src = format!("job \"j\" {{\n  group \"g\" {{\n    network {{\n      port \"db\" {{\n        static = 5432\n      }}\n    }}\n    task \"t\" {{\n{TASK_OK}      network {{\n        mode = \"none\"\n      }}\n    }}\n  }}\n}}\n");
    let job = parse_str(&src, "net.hcl").unwrap();
    assert_eq!(job.groups[0].network.as_ref().unwrap().ports[0].static_port, 5432);
}

#[test]
fn group_network_rules_apply_to_json_jobs() {
    let src = format!("job \"j\" {{\n  group \"g\" {{\n    network {{\n      mode = \"bridge\"\n      port \"a\" {{}}\n    }}\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n}}\n");
    let mut job = parse_str(&src, "net.hcl").unwrap();
    let network = job.groups[0].network.as_mut().unwrap();
    network.ports[0].to = 65536;
    network.ports.push(network.ports[0].clone());
    network.ports[1].label = "a-b".into();
    let err = validate_job(&job).unwrap_err().to_string();
    assert!(err.contains("job.j.group.g.network.port.a.to: must be a port number between 1 and 65535, found 65536"), "{err}");
    assert!(err.contains("job.j.group.g.network.port.a-b.name: port label must be"), "{err}");
}

#[test]
fn migrate_and_reschedule_decode_with_type_defaults() {
    let src = format!("job \"j\" {{\n  type = \"batch\"\n  group \"g\" {{\n    migrate {{\n      max_parallel = 2\n    }}\n    reschedule {{\n      attempts = 3\n      delay    = \"10s\"\n      delay_function = \"fibonacci\"\n      max_delay = \"5m\"\n    }}\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n  group \"plain\" {{\n    task \"t\" {{\n{TASK_OK}    }}\n  }}\n}}\n");
    let job = parse_str(&src, "resched.hcl").unwrap();
    let g = &job.groups[0];
    assert_eq!(g.migrate.as_ref().map(|m| m.max_parallel), Some(2));
    let r = g.reschedule.clone().unwrap();
    assert_eq!((r.attempts, r.delay_ms, r.max_delay_ms, r.unlimited), (3, 10_000, 300_000, false));
    assert_eq!(r.delay_function, "fibonacci");
    assert_eq!(r.interval_ms, 24 * 3_600_000, "batch default interval kept");
    // No block: the scheduler applies the job type's default.
    assert!(job.groups[1].migrate.is_none() && job.groups[1].reschedule.is_none());
    let svc = mlp_proto::jobspec::default_reschedule(false);
    assert!(svc.unlimited && svc.delay_function == "exponential" && svc.delay_ms == 30_000 && svc.max_delay_ms == 3_600_000);
}

#[test]
fn affinity_and_spread_decode_with_nomad_defaults() {
    let src = format!("job \"j\" {{\n  affinity {{\n    attribute = \"${{node.datacenter}}\"\n    value     = \"dc1\"\n  }}\n  spread {{\n    attribute = \"${{node.datacenter}}\"\n  }}\n  group \"g\" {{\n    affinity {{\n      attribute = \"${{meta.rack}}\"\n      operator  = \"!=\"\n      value     = \"r9\"\n      weight    = -20\n    }}\n    spread {{\n      attribute = \"${{meta.rack}}\"\n      weight    = 100\n      target \"r1\" {{\n        percent = 70\n      }}\n      target \"r2\" {{\n        percent = 30\n      }}\n    }}\n    task \"t\" {{\n{TASK_OK}      affinity {{\n        attribute = \"${{attr.gpu.model}}\"\n        value     = \"H100\"\n        weight    = 100\n      }}\n      affinity {{\n        attribute = \"${{meta.nvlink}}\"\n        operator  = \"is_set\"\n      }}\n    }}\n  }}\n}}\n");
    let job = parse_str(&src, "prefs.hcl").unwrap();
    let aff = |attribute: &str, operator: &str, value: &str, weight: i32| Affinity {
        attribute: attribute.into(),
        operator: operator.into(),
        value: value.into(),
        weight: Some(weight),
    };
    assert_eq!(job.affinities, vec![aff("${node.datacenter}", "=", "dc1", 50)]);
    assert_eq!(job.spreads, vec![Spread { attribute: "${node.datacenter}".into(), weight: Some(50), targets: vec![] }]);
    let g = &job.groups[0];
    assert_eq!(g.affinities, vec![aff("${meta.rack}", "!=", "r9", -20)]);
    let target = |value: &str, percent: u32| SpreadTarget { value: value.into(), percent };
    assert_eq!(
        g.spreads,
        vec![Spread { attribute: "${meta.rack}".into(), weight: Some(100), targets: vec![target("r1", 70), target("r2", 30)] }]
    );
    assert_eq!(g.tasks[0].affinities, vec![aff("${attr.gpu.model}", "=", "H100", 100), aff("${meta.nvlink}", "is_set", "", 50)]);
}

#[test]
fn affinity_and_spread_rules_apply_to_json_jobs() {
    let mut job = parse_str(&with_task(TASK_OK), "ok.hcl").unwrap();
    job.groups[0].affinities =
        vec![Affinity { attribute: "${meta.rack}".into(), value: "r1".into(), weight: Some(0), ..Default::default() }];
    job.spreads = vec![Spread {
        attribute: "meta.rack".into(),
        weight: Some(0),
        targets: vec![SpreadTarget { value: "a".into(), percent: 60 }, SpreadTarget { value: "b".into(), percent: 60 }],
    }];
    insta::assert_snapshot!("validate_job_affinity_spread", validate_job(&job).unwrap_err().to_string());
    job.groups[0].affinities[0].weight = Some(-100);
    job.spreads[0].attribute = "${meta.rack}".into();
    job.spreads[0].weight = Some(1);
    job.spreads[0].targets[1].percent = 40;
    validate_job(&job).unwrap();
    job.groups[0].tasks[0].affinities = (0..33)
        .map(|i| Affinity { attribute: "${meta.rack}".into(), value: format!("r{i}"), weight: Some(1), ..Default::default() })
        .collect();
    let err = validate_job(&job).unwrap_err().to_string();
    assert_eq!(err, "job.j.group.g.task.t.affinity[32]: at most 32 affinity blocks here, found 33");
}

#[test]
fn wasm_task_decodes_module_args_and_env() {
    let src = with_task(
        "      driver = \"wasm\"\n      config {\n        module = \"local/app.wasm\"\n        args = [\"--n\", \"3\"]\n        env = { MODE = \"fast\" }\n      }\n",
    );
    let job = parse_str(&src, "wasm.hcl").unwrap();
    let task = &job.groups[0].tasks[0];
    assert_eq!(task.driver, "wasm");
    let config = task.config.as_ref().unwrap();
    assert_eq!(config.module, "local/app.wasm");
    assert_eq!(config.args, vec!["--n", "3"]);
    assert_eq!(config.env.get("MODE").map(String::as_str), Some("fast"));
    assert!(config.command.is_empty());
    // An absolute path on the node, and the block form of `env`.
    let src = with_task("      driver = \"wasm\"\n      config {\n        module = \"/opt/m.wasm\"\n        env {\n          A = \"1\"\n        }\n      }\n");
    let job = parse_str(&src, "wasm.hcl").unwrap();
    let config = job.groups[0].tasks[0].config.as_ref().unwrap();
    assert_eq!(config.module, "/opt/m.wasm");
    assert_eq!(config.env.get("A").map(String::as_str), Some("1"));
}

#[test]
fn oci_task_decodes_image_overrides_and_auth() {
    let src = with_task(
        "      driver = \"oci\"\n      config {\n        image = \"127.0.0.1:5000/team/trainer:1.4\"\n        entrypoint = [\"/bin/sh\", \"-c\"]\n        command = \"echo\"\n        args = [\"hi\"]\n        work_dir = \"/srv\"\n        auth {\n          username = \"u\"\n          password = \"p\"\n        }\n      }\n",
    );
    let job = parse_str(&src, "oci.hcl").unwrap();
    let task = &job.groups[0].tasks[0];
    assert_eq!(task.driver, "oci");
    let config = task.config.as_ref().unwrap();
    assert_eq!(config.image, "127.0.0.1:5000/team/trainer:1.4");
    assert_eq!(config.entrypoint, vec!["/bin/sh", "-c"]);
    assert_eq!((config.command.as_str(), config.args.clone()), ("echo", vec!["hi".to_string()]));
    assert_eq!(config.work_dir, "/srv");
    let auth = config.auth.as_ref().unwrap();
    assert_eq!((auth.username.as_str(), auth.password.as_str()), ("u", "p"));
    // A pinned digest; the redaction the API applies to every read.
    let digest = format!("busybox@sha256:{}", "a".repeat(64));
    assert!(mlp_proto::jobspec::check_image_reference(&digest).is_ok());
    assert!(mlp_proto::jobspec::check_image_reference("localhost/a/b-c_d.e:v1.0-rc").is_ok());
    assert!(mlp_proto::jobspec::check_image_reference("a//b").is_err());
    let mut job = job;
    mlp_proto::redact::job(&mut job);
    let auth = job.groups[0].tasks[0].config.as_ref().unwrap().auth.as_ref().unwrap();
    assert_eq!(auth.password, mlp_proto::redact::REDACTED);
}
