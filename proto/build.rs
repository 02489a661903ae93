//! Compiles `proto/mlp.proto`. Uses `$PROTOC` when set, else the vendored protoc, so that a
//! fresh machine needs nothing but cargo.
//!
//! Every message field gets `#[serde(skip_serializing_if = "crate::compact::skip…")]`: a field
//! at its default is left out of the JSON written inside [`crate::compact::encode`] (Raft
//! entries, forwarded writes, snapshots), and written as before everywhere else (the HTTP API,
//! the event stream, files users read). The fields are listed from protoc's descriptor set, the
//! same one the code is generated from, so a new field gets the attribute without anyone
//! remembering to add it.
use std::path::PathBuf;

use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::DescriptorProto;

/// Fields left out of every JSON when empty (API output included): they keep that attribute.
const ALWAYS_SKIPPED: [(&str, &str); 12] = [
    // An event carries one payload: the JSON stream (`/v1/event/stream`) leaves out the others.
    ("mlp.v1.Event.job", "Option::is_none"),
    ("mlp.v1.Event.evaluation", "Option::is_none"),
    ("mlp.v1.Event.allocation", "Option::is_none"),
    ("mlp.v1.Event.node", "Option::is_none"),
    ("mlp.v1.Event.deployment", "Option::is_none"),
    ("mlp.v1.Event.services", "Vec::is_empty"),
    // Job types (issue 16 §2): absent from a job's JSON unless set, so other jobs read as before.
    ("mlp.v1.Job.parameterized", "Option::is_none"),
    ("mlp.v1.Job.periodic", "Option::is_none"),
    ("mlp.v1.Job.parent_id", "String::is_empty"),
    ("mlp.v1.Job.payload", "Vec::is_empty"),
    // Host volumes (issue 15 §4): absent from a job's JSON unless used.
    ("mlp.v1.TaskGroup.volumes", "Vec::is_empty"),
    ("mlp.v1.Task.volume_mounts", "Vec::is_empty"),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc: PathBuf = protoc_bin_vendored::protoc_bin_path()?;
        std::env::set_var("PROTOC", protoc);
    }
    println!("cargo:rerun-if-changed=proto/mlp.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");

    // One protoc run: its descriptor set lists the fields and is what the code is generated from.
    let fds = tonic_build::Config::new().load_fds(&["proto/mlp.proto"], &["proto"])?;
    let mut fields = Vec::new();
    for file in &fds.file {
        let package = file.package();
        for message in &file.message_type {
            message_fields(package, message, &mut fields);
        }
    }

    let mut config = tonic_build::configure()
        .btree_map(["."])
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .type_attribute(".", "#[serde(default)]");
    for (path, skip) in ALWAYS_SKIPPED {
        config = config.field_attribute(format!(".{path}"), format!("#[serde(skip_serializing_if = \"{skip}\")]"));
    }
    for (path, skip) in &fields {
        if ALWAYS_SKIPPED.iter().any(|(p, _)| p == path) {
            continue;
        }
        config = config.field_attribute(format!(".{path}"), format!("#[serde(skip_serializing_if = \"crate::compact::{skip}\")]"));
    }
    config.compile_fds(fds)?;
    Ok(())
}

/// `(full path, skip function)` of every field of `message` and of its nested messages (not
/// the generated entries of map fields). A real `oneof` (none today) gets the attribute on the
/// oneof's own field.
fn message_fields(scope: &str, message: &DescriptorProto, out: &mut Vec<(String, &'static str)>) {
    if message.options.as_ref().is_some_and(|o| o.map_entry()) {
        return;
    }
    let name = format!("{scope}.{}", message.name());
    let mut oneofs = std::collections::BTreeSet::new();
    for field in &message.field {
        if let Some(i) = field.oneof_index.filter(|_| !field.proto3_optional()) {
            oneofs.insert(i);
            continue;
        }
        let float = field.label() != Label::Repeated && !field.proto3_optional() && matches!(field.r#type(), Type::Double | Type::Float);
        out.push((format!("{name}.{}", field.name()), if float { "skip_float" } else { "skip" }));
    }
    for i in oneofs {
        if let Some(oneof) = message.oneof_decl.get(i as usize) {
            out.push((format!("{name}.{}", oneof.name()), "skip"));
        }
    }
    for nested in &message.nested_type {
        message_fields(&name, nested, out);
    }
}
