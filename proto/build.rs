//! Compiles `proto/mlp.proto`. Uses `$PROTOC` when set, else the vendored protoc, so that a
//! fresh machine needs nothing but cargo.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc: PathBuf = protoc_bin_vendored::protoc_bin_path()?;
        std::env::set_var("PROTOC", protoc);
    }
    println!("cargo:rerun-if-changed=proto/mlp.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    tonic_build::configure()
        .btree_map(["."])
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .type_attribute(".", "#[serde(default)]")
        // An event carries one payload: the JSON stream (`/v1/event/stream`) leaves out the others.
        .field_attribute("mlp.v1.Event.job", "#[serde(skip_serializing_if = \"Option::is_none\")]")
        .field_attribute("mlp.v1.Event.evaluation", "#[serde(skip_serializing_if = \"Option::is_none\")]")
        .field_attribute("mlp.v1.Event.allocation", "#[serde(skip_serializing_if = \"Option::is_none\")]")
        .field_attribute("mlp.v1.Event.node", "#[serde(skip_serializing_if = \"Option::is_none\")]")
        .field_attribute("mlp.v1.Event.deployment", "#[serde(skip_serializing_if = \"Option::is_none\")]")
        .field_attribute("mlp.v1.Event.services", "#[serde(skip_serializing_if = \"Vec::is_empty\")]")
        // Job types (issue 16 §2): absent from a job's JSON unless set, so other jobs read as before.
        .field_attribute("mlp.v1.Job.parameterized", "#[serde(skip_serializing_if = \"Option::is_none\")]")
        .field_attribute("mlp.v1.Job.periodic", "#[serde(skip_serializing_if = \"Option::is_none\")]")
        .field_attribute("mlp.v1.Job.parent_id", "#[serde(skip_serializing_if = \"String::is_empty\")]")
        .field_attribute("mlp.v1.Job.payload", "#[serde(skip_serializing_if = \"Vec::is_empty\")]")
        // Host volumes (issue 15 §4): absent from a job's JSON unless used.
        .field_attribute("mlp.v1.TaskGroup.volumes", "#[serde(skip_serializing_if = \"Vec::is_empty\")]")
        .field_attribute("mlp.v1.Task.volume_mounts", "#[serde(skip_serializing_if = \"Vec::is_empty\")]")
        .compile_protos(&["proto/mlp.proto"], &["proto"])?;
    Ok(())
}
