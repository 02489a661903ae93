//! `service` and `check` blocks in job specs (issue 13 §3): decoding, defaults, and the rules,
//! each reported at file:line:column with the field path.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mlp_proto::jobspec::{apply_defaults, parse_str, validate_job};

const TASK_OK: &str = "      driver = \"exec\"\n      config {\n        command = \"/bin/true\"\n      }\n";

/// A bridge-mode group with port `http`, the given group-level body, and one task with the given
/// task-level extra body.
fn job(group_extra: &str, task_extra: &str) -> String {
    format!(
        "job \"j\" {{\n  group \"g\" {{\n    network {{\n      mode = \"bridge\"\n      port \"http\" {{\n        to = 8080\n      }}\n    }}\n{group_extra}    task \"t\" {{\n{TASK_OK}{task_extra}    }}\n  }}\n}}\n"
    )
}

fn errors(src: &str) -> String {
    match parse_str(src, "svc.hcl") {
        Ok(job) => panic!("expected errors, got {job:#?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn services_decode_at_group_and_task_level_with_check_defaults() {
    let group = "    service {\n      name = \"web\"\n      port = \"http\"\n      tags = [\"v1\", \"blue\"]\n      check {\n        type     = \"http\"\n        interval = \"5s\"\n      }\n      check {\n        type    = \"script\"\n        command = \"/bin/true\"\n        args    = [\"-x\"]\n      }\n    }\n";
    let task = "      service {\n        name = \"admin\"\n        port = 9000\n        check {\n          type    = \"tcp\"\n          timeout = \"1s\"\n        }\n      }\n";
    let j = parse_str(&job(group, task), "svc.hcl").expect("valid");
    let g = &j.groups[0];
    assert_eq!(g.services.len(), 1);
    let s = &g.services[0];
    assert_eq!((s.name.as_str(), s.port.as_str(), s.tags.clone()), ("web", "http", vec!["v1".to_string(), "blue".to_string()]));
    assert_eq!((s.checks[0].r#type.as_str(), s.checks[0].path.as_str()), ("http", "/"), "the path defaults to /");
    assert_eq!((s.checks[0].interval_ms, s.checks[0].timeout_ms), (5_000, 2_000));
    assert_eq!((s.checks[1].command.as_str(), s.checks[1].args.clone()), ("/bin/true", vec!["-x".to_string()]));
    assert_eq!((s.checks[1].interval_ms, s.checks[1].timeout_ms), (10_000, 2_000), "the defaults");
    let t = &g.tasks[0].services[0];
    assert_eq!((t.name.as_str(), t.port.as_str(), t.checks[0].timeout_ms), ("admin", "9000", 1_000));
}

#[test]
fn bad_services_are_reported_with_positions_and_paths() {
    let group = concat!(
        "    service {\n",
        "      name = \"Web_1\"\n",
        "      port = \"htp\"\n",
        "      check {\n",
        "        type     = \"grpc\"\n",
        "        interval = \"10ms\"\n",
        "      }\n",
        "      check {\n",
        "        type    = \"http\"\n",
        "        path    = \"health\"\n",
        "        command = \"/bin/true\"\n",
        "        timeout = \"1m\"\n",
        "      }\n",
        "    }\n",
        "    service {\n",
        "      name = \"dup\"\n",
        "      port = 70000\n",
        "      check {\n",
        "        type = \"script\"\n",
        "      }\n",
        "      colour = \"red\"\n",
        "    }\n",
        "    service {\n",
        "      name = \"dup\"\n",
        "    }\n",
    );
    let task = "      service {\n        name = \"-x\"\n        check {\n          type = \"tcp\"\n        }\n      }\n";
    let err = errors(&job(group, task));
    for want in [
        "svc.hcl:10:14: job.j.group.g.service[0].name: invalid service name \"Web_1\": must be a DNS label",
        "svc.hcl:11:14: job.j.group.g.service[0].port: no port labelled \"htp\" in the group's network (known: http)",
        "svc.hcl:13:20: job.j.group.g.service[0].check[0].type: unknown check type \"grpc\"; expected one of: http, tcp, script",
        "svc.hcl:14:20: job.j.group.g.service[0].check[0].interval: must be between 100ms and 1h, found 10ms",
        "job.j.group.g.service[0].check[1].path: must be a URL path starting with /",
        "job.j.group.g.service[0].check[1].command: only script checks run a command",
        "job.j.group.g.service[0].check[1].timeout: must be above 0 and at most the interval (10s), found 1m",
        "job.j.group.g.service[1].port: must be a port number between 1 and 65535 or a port label, found 70000",
        "job.j.group.g.service[1].check[0].command: a script check needs a command",
        "job.j.group.g.service[1]: unknown field \"colour\"",
        "job.j.group.g.service[2].name: duplicate service name \"dup\" here",
        "job.j.group.g.task.t.service[0].name: invalid service name \"-x\"",
        "job.j.group.g.task.t.service[0].check[0].port: a tcp check needs a port",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

#[test]
fn service_rules_apply_to_json_jobs_too() {
    let mut j = parse_str(&job("    service {\n      name = \"web\"\n      port = \"http\"\n    }\n", ""), "svc.hcl").expect("valid");
    validate_job(&j).expect("valid as JSON too");
    j.groups[0].services[0].name = "web.example".into();
    j.groups[0].services[0].checks.push(mlp_proto::v1::ServiceCheck { r#type: "http".into(), ..Default::default() });
    apply_defaults(&mut j);
    let err = validate_job(&j).expect_err("invalid").to_string();
    assert!(err.contains("job.j.group.g.service[0].name: invalid service name \"web.example\""), "{err}");
    // Defaults are applied at every door: the check got an interval, a timeout and a path.
    assert!(!err.contains("interval") && !err.contains("timeout") && !err.contains("path"), "{err}");
}
