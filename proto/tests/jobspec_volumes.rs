//! Host volumes in job specs (issue 15 §4): a group's `volume "LABEL"` blocks and a task's
//! `volume_mount` blocks, decoded from HCL and JSON, and the rules, each reported at
//! file:line:column with the field path.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mlp_proto::jobspec::{parse_str, validate_job};
use mlp_proto::v1::Job;

/// A job with one group (`group_extra` before its tasks) and one task of `driver`
/// (`task_extra` after its config).
fn job(group_extra: &str, driver: &str, task_extra: &str) -> String {
    format!(
        "job \"j\" {{\n  group \"g\" {{\n{group_extra}    task \"t\" {{\n      driver = \"{driver}\"\n      config {{\n        command = \"/bin/true\"\n      }}\n{task_extra}    }}\n  }}\n}}\n"
    )
}

fn errors(src: &str) -> String {
    match parse_str(src, "vol.hcl") {
        Ok(job) => panic!("expected errors, got {job:#?}"),
        Err(e) => e.to_string(),
    }
}

const TWO_VOLUMES: &str = concat!(
    "    volume \"data\" {\n",
    "      type      = \"host\"\n",
    "      source    = \"datasets\"\n",
    "      read_only = true\n",
    "    }\n",
    "    volume \"scratch\" {\n",
    "      type   = \"host\"\n",
    "      source = \"scratch.fast\"\n",
    "    }\n",
);

const TWO_MOUNTS: &str = concat!(
    "      volume_mount {\n",
    "        volume      = \"data\"\n",
    "        destination = \"/data\"\n",
    "        read_only   = true\n",
    "      }\n",
    "      volume_mount {\n",
    "        volume      = \"scratch\"\n",
    "        destination = \"/scratch\"\n",
    "      }\n",
);

#[test]
fn volumes_and_mounts_decode_from_hcl() {
    let j = parse_str(&job(TWO_VOLUMES, "exec", TWO_MOUNTS), "vol.hcl").expect("valid");
    let g = &j.groups[0];
    let vols: Vec<(&str, &str, &str, bool)> =
        g.volumes.iter().map(|v| (v.name.as_str(), v.r#type.as_str(), v.source.as_str(), v.read_only)).collect();
    assert_eq!(vols, vec![("data", "host", "datasets", true), ("scratch", "host", "scratch.fast", false)]);
    let mounts: Vec<(&str, &str, bool)> =
        g.tasks[0].volume_mounts.iter().map(|m| (m.volume.as_str(), m.destination.as_str(), m.read_only)).collect();
    assert_eq!(mounts, vec![("data", "/data", true), ("scratch", "/scratch", false)]);
}

#[test]
fn volumes_round_trip_through_json_and_obey_the_same_rules() {
    let j = parse_str(&job(TWO_VOLUMES, "exec", TWO_MOUNTS), "vol.hcl").expect("valid");
    let text = serde_json::to_string(&j).expect("json");
    assert!(text.contains("\"volumes\"") && text.contains("\"volume_mounts\""), "{text}");
    let mut back: Job = serde_json::from_str(&text).expect("decode");
    assert_eq!(back, j);
    validate_job(&back).expect("valid as JSON too");
    // A job without volumes has neither field in its JSON (older readers see it as before).
    let plain = parse_str(&job("", "exec", ""), "vol.hcl").expect("valid");
    let plain_text = serde_json::to_string(&plain).expect("json");
    assert!(!plain_text.contains("volume"), "{plain_text}");

    back.groups[0].volumes[0].r#type = "csi".into();
    back.groups[0].tasks[0].volume_mounts[1].destination = "scratch".into();
    let err = validate_job(&back).expect_err("invalid").to_string();
    assert!(err.contains("job.j.group.g.volume.data.type: unsupported volume type \"csi\"; supported: host"), "{err}");
    assert!(err.contains("job.j.group.g.task.t.volume_mount[1].destination: \"scratch\" must be an absolute path"), "{err}");
}

#[test]
fn bad_volumes_are_reported_with_positions_and_paths() {
    let group = concat!(
        "    volume \"data\" {\n",       // line 3
        "      type      = \"csi\"\n",   // 4
        "      source    = \"\"\n",      // 5
        "      read_only = true\n",      // 6
        "    }\n",                       // 7
        "    volume \"data\" {\n",       // 8
        "      type   = \"host\"\n",     // 9
        "      source = \"bad name\"\n", // 10
        "      colour = 1\n",            // 11
        "    }\n",                       // 12
        "    volume \"nosrc\" {\n",      // 13
        "    }\n",                       // 14
    );
    let task = concat!(
        "      volume_mount {\n",                // 20
        "        volume      = \"data\"\n",      // 21
        "        destination = \"data\"\n",      // 22
        "      }\n",                             // 23
        "      volume_mount {\n",                // 24
        "        volume      = \"missing\"\n",   // 25
        "        destination = \"/a/../etc\"\n", // 26
        "      }\n",                             // 27
        "      volume_mount {\n",                // 28
        "        volume      = \"nosrc\"\n",     // 29
        "        destination = \"/x\"\n",        // 30
        "      }\n",                             // 31
        "      volume_mount {\n",                // 32
        "        volume      = \"nosrc\"\n",     // 33
        "        destination = \"/x/\"\n",       // 34
        "      }\n",                             // 35
        "      volume_mount {\n",                // 36
        "        volume      = \"nosrc\"\n",     // 37
        "        destination = \"/local/in\"\n", // 38
        "        read_only   = \"yes\"\n",       // 39
        "      }\n",                             // 40
    );
    let err = errors(&job(group, "exec", task));
    for want in [
        "vol.hcl:4:19: job.j.group.g.volume.data.type: unsupported volume type \"csi\"; supported: host",
        "vol.hcl:5:19: job.j.group.g.volume.data.source: missing required field",
        "vol.hcl:8:12: job.j.group.g.volume.data: duplicate volume label \"data\" in this group",
        "vol.hcl:10:16: job.j.group.g.volume.data.source: invalid host volume name \"bad name\"",
        "vol.hcl:11:7: job.j.group.g.volume.data: unknown field \"colour\"",
        "job.j.group.g.volume.nosrc.type: missing required field; supported volume types: host",
        "job.j.group.g.volume.nosrc.source: missing required field",
        "vol.hcl:20:7: job.j.group.g.task.t.volume_mount[0].read_only: volume \"data\" is read-only; a mount of it must set `read_only = true`",
        "vol.hcl:22:23: job.j.group.g.task.t.volume_mount[0].destination: \"data\" must be an absolute path",
        "vol.hcl:25:23: job.j.group.g.task.t.volume_mount[1].volume: no volume labelled \"missing\" in this group (declared: data, nosrc)",
        "vol.hcl:26:23: job.j.group.g.task.t.volume_mount[1].destination: \"/a/../etc\" may not contain `..`",
        "vol.hcl:34:23: job.j.group.g.task.t.volume_mount[3].destination: \"/x/\" is already the destination of volume_mount[2] of this task",
        "vol.hcl:39:23: job.j.group.g.task.t.volume_mount[4].read_only: expected a boolean (true or false)",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    // The decoder failed on read_only, so its default is not held against the mount; the
    // reserved destination is still reported.
    assert!(err.contains("job.j.group.g.task.t.volume_mount[4].destination: \"/local/in\" is at or under /local"), "{err}");
}

#[test]
fn mounts_need_declared_volumes_and_a_driver_that_can_mount() {
    let mount = "      volume_mount {\n        volume      = \"data\"\n        destination = \"/data\"\n      }\n";
    let err = errors(&job("", "exec", mount));
    assert!(
        err.contains("vol.hcl:9:23: job.j.group.g.task.t.volume_mount[0].volume: no volume labelled \"data\" in this group (the group declares no volumes)"),
        "{err}"
    );
    let vol = "    volume \"data\" {\n      type   = \"host\"\n      source = \"datasets\"\n    }\n";
    let wasm = format!(
        "job \"j\" {{\n  group \"g\" {{\n{vol}    task \"t\" {{\n      driver = \"wasm\"\n      config {{\n        module = \"local/a.wasm\"\n      }}\n{mount}    }}\n  }}\n}}\n"
    );
    let err = errors(&wasm);
    assert!(err.contains("job.j.group.g.task.t.volume_mount[0]: the wasm driver cannot mount host volumes"), "{err}");
    // raw_exec may name volumes (it is told their host paths; see docs/jobspec.md).
    parse_str(&job(vol, "raw_exec", mount), "vol.hcl").expect("raw_exec mounts are accepted");
    for bad in ["/", "/proc/x", "/dev", "/secrets", "/./data"] {
        let m = format!("      volume_mount {{\n        volume      = \"data\"\n        destination = \"{bad}\"\n      }}\n");
        let err = errors(&job(vol, "exec", &m));
        assert!(err.contains("job.j.group.g.task.t.volume_mount[0].destination:"), "{bad}: {err}");
    }
}
