//! Bounds on every repeatable or sized part of a job, whichever door it came in by (HCL file,
//! JSON over HTTP, protobuf over gRPC). They are far above what a real job needs and exist so
//! that no submission can make a server spend unbounded memory, CPU or stack; each one has its
//! own error naming it. `docs/jobspec.md` lists them.

/// Largest job spec file (HCL text) accepted, in bytes.
pub const MAX_SPEC_BYTES: usize = 1024 * 1024;
/// Largest job accepted, as its protobuf encoding, in bytes (the JSON and HCL forms are checked
/// against their own limits first).
pub const MAX_JOB_BYTES: usize = 1024 * 1024;
/// Deepest nesting of blocks, lists, objects, parentheses and template interpolations in a job
/// spec file (a real one nests about 6 levels).
pub const MAX_NESTING: usize = 64;
/// Operator characters (`!`, `-`, `+`, `?`, `<`, …) outside string text in a job spec file; a
/// real one has next to none, and long chains make the parser recurse.
pub const MAX_OPERATORS: usize = 1_000;

/// Task groups in one job.
pub const MAX_GROUPS: usize = 100;
/// `port` blocks in one group's `network`.
pub const MAX_PORTS: usize = 64;
/// Tasks in one group.
pub const MAX_TASKS: usize = 100;
/// Allocations one group may ask for (`count`).
pub const MAX_COUNT: u32 = 10_000;
/// Allocations of one job, all groups together.
pub const MAX_JOB_ALLOCS: u64 = 20_000;
/// `constraint` blocks at one level (job, group or task).
pub const MAX_CONSTRAINTS: usize = 64;
/// `affinity` blocks at one level (job, group or task).
pub const MAX_AFFINITIES: usize = 32;
/// `spread` blocks at one level (job or group).
pub const MAX_SPREADS: usize = 8;
/// `target` blocks in one `spread`.
pub const MAX_SPREAD_TARGETS: usize = 100;
/// Entries in one `env` or `meta` map.
pub const MAX_MAP_ENTRIES: usize = 1_000;
/// Arguments of one task (`config.args`).
pub const MAX_ARGS: usize = 1_000;
/// `artifact` blocks in one task.
pub const MAX_ARTIFACTS: usize = 32;
/// `volume` blocks per group and `volume_mount` blocks per task.
pub const MAX_VOLUMES: usize = 32;
/// Allowed GPU models in one `gpu` block.
pub const MAX_GPU_MODELS: usize = 32;

/// Keys of `env` and `meta`, constraint attributes, users, GPU models.
pub const MAX_KEY_BYTES: usize = 256;
/// Values of `env` and `meta`, each argument, the command.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// `service` blocks per group (its own and its tasks' together).
pub const MAX_SERVICES: usize = 32;
/// `check` blocks per service.
pub const MAX_CHECKS: usize = 8;
/// Tags per service.
pub const MAX_TAGS: usize = 32;
/// Bytes of one tag.
pub const MAX_TAG_BYTES: usize = 128;
/// Bytes of an http check's path.
pub const MAX_CHECK_PATH_BYTES: usize = 1024;
/// Shortest check interval.
pub const MIN_CHECK_INTERVAL_MS: u64 = 100;
/// Longest check interval (and timeout).
pub const MAX_CHECK_INTERVAL_MS: u64 = 60 * 60 * 1000;
/// A check's default interval and timeout.
pub const DEFAULT_CHECK_INTERVAL_MS: u64 = 10_000;
pub const DEFAULT_CHECK_TIMEOUT_MS: u64 = 2_000;
