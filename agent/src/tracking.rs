//! MLflow for tasks (issue 17 §3): every task mlp starts can log runs to the cluster's own
//! tracking server with no configuration in its job.
//!
//! * `MLFLOW_TRACKING_URI`: the servers' tracking API. By default the URI the answering server
//!   gave at registration (`RegisterNodeResponse.tracking_uri`, its HTTP address); the agent's
//!   `--tracking-uri` flag fixes another one or turns it off (`none`).
//! * `MLFLOW_RUN_CONTEXT`: the lineage of the run, as tags. MLflow's client reads this variable
//!   (its `SystemEnvironmentContext`, a documented developer-stable name) and puts its JSON
//!   object's entries on every run `mlflow.start_run` creates, so a model version leads back to
//!   the job, its version, the allocation and the node that trained it: `mlp.job`,
//!   `mlp.job_version`, `mlp.namespace`, `mlp.group`, `mlp.alloc`, `mlp.alloc_name`,
//!   `mlp.task`, `mlp.node`.
//! * `MLFLOW_WORKSPACE`: the job's namespace, with the cluster's tracking URI only. MLflow's
//!   client (3.x) sends it as the `X-MLFLOW-WORKSPACE` header, and the servers keep each
//!   namespace's experiments, runs, models and artifacts apart (a workspace is a namespace).
//!
//! A job that sets any of these variables in a task's `env` keeps its own; a job that sets its
//! own `MLFLOW_TRACKING_URI` gets no `MLFLOW_WORKSPACE` (its server may have no workspaces).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// The task variable that points MLflow's client at a tracking server.
pub const TRACKING_URI_VAR: &str = "MLFLOW_TRACKING_URI";
/// The task variable whose JSON object MLflow's client adds as tags to the runs it starts.
pub const RUN_CONTEXT_VAR: &str = "MLFLOW_RUN_CONTEXT";
/// The task variable that names the MLflow workspace (the job's namespace).
pub const WORKSPACE_VAR: &str = "MLFLOW_WORKSPACE";
/// Longest tracking URI accepted (from a flag or a server).
const MAX_URI: usize = 2048;

/// Where tasks' `MLFLOW_TRACKING_URI` comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TrackingMode {
    /// The URI the servers give at registration (the default).
    #[default]
    FromServers,
    /// This URI, whatever the servers say.
    Fixed(String),
    /// No `MLFLOW_TRACKING_URI` (the lineage tags are still set).
    Off,
}

/// A tracking URI that is not one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("tracking URI {uri:?}: {reason}")]
pub struct BadTrackingUri {
    uri: String,
    reason: &'static str,
}

/// Checks a tracking URI: `http://` or `https://`, a host, no whitespace or control characters.
pub fn check_uri(uri: &str) -> Result<(), BadTrackingUri> {
    let bad = |reason| Err(BadTrackingUri { uri: uri.chars().take(80).collect(), reason });
    if uri.len() > MAX_URI {
        return bad("longer than 2048 bytes");
    }
    if uri.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return bad("contains whitespace or control characters");
    }
    let Some(rest) = uri.strip_prefix("http://").or_else(|| uri.strip_prefix("https://")) else {
        return bad("must start with http:// or https://");
    };
    if rest.is_empty() || rest.starts_with('/') {
        return bad("has no host");
    }
    Ok(())
}

impl TrackingMode {
    /// Parses the `--tracking-uri` flag: `none` (or `off`) turns it off, anything else must be
    /// an `http(s)://` URI.
    pub fn parse(flag: &str) -> Result<TrackingMode, BadTrackingUri> {
        match flag {
            "none" | "off" => Ok(TrackingMode::Off),
            uri => check_uri(uri).map(|()| TrackingMode::Fixed(uri.trim_end_matches('/').to_string())),
        }
    }
}

/// The tracking URI in effect on this agent, shared by the registration loop (which learns the
/// servers' URI) and the task runners (which read it at each task start).
#[derive(Debug, Clone, Default)]
pub struct TrackingUri {
    mode: TrackingMode,
    learned: Arc<RwLock<Option<String>>>,
}

impl TrackingUri {
    /// A tracking URI following `mode`.
    pub fn new(mode: TrackingMode) -> TrackingUri {
        TrackingUri { mode, learned: Arc::default() }
    }

    /// Takes the URI a server gave at registration (when the mode follows the servers). A URI
    /// that fails [`check_uri`] is ignored with a warning; an empty one (a server that serves
    /// no tracking API) clears it.
    pub fn learn(&self, uri: &str) {
        if self.mode != TrackingMode::FromServers {
            return;
        }
        let uri = uri.trim_end_matches('/');
        let new = if uri.is_empty() {
            None
        } else if let Err(e) = check_uri(uri) {
            tracing::warn!(error = %e, "ignoring the tracking URI the server gave");
            return;
        } else {
            Some(uri.to_string())
        };
        if let Ok(mut cur) = self.learned.write() {
            *cur = new;
        }
    }

    /// The URI tasks get now; None: none.
    pub fn current(&self) -> Option<String> {
        match &self.mode {
            TrackingMode::Fixed(uri) => Some(uri.clone()),
            TrackingMode::Off => None,
            TrackingMode::FromServers => self.learned.read().ok().and_then(|u| u.clone()),
        }
    }
}

/// What produced a run: the tags of `MLFLOW_RUN_CONTEXT`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lineage {
    pub job: String,
    pub job_version: u64,
    pub namespace: String,
    pub group: String,
    pub alloc_id: String,
    pub alloc_name: String,
    pub task: String,
    pub node_id: String,
}

impl Lineage {
    /// The tags, by name.
    pub fn tags(&self) -> BTreeMap<&'static str, String> {
        BTreeMap::from([
            ("mlp.job", self.job.clone()),
            ("mlp.job_version", self.job_version.to_string()),
            ("mlp.namespace", self.namespace.clone()),
            ("mlp.group", self.group.clone()),
            ("mlp.alloc", self.alloc_id.clone()),
            ("mlp.alloc_name", self.alloc_name.clone()),
            ("mlp.task", self.task.clone()),
            ("mlp.node", self.node_id.clone()),
        ])
    }
}

/// Adds `MLFLOW_TRACKING_URI` (when `uri` is some) and `MLFLOW_RUN_CONTEXT` to a task's `env`,
/// each unless the task's env already has it, and `MLFLOW_WORKSPACE` (the job's namespace)
/// when the cluster's URI was added and the task sets no workspace of its own.
pub fn add_task_env(env: &mut BTreeMap<String, String>, uri: Option<String>, lineage: &Lineage) {
    if let Some(uri) = uri {
        if !env.contains_key(TRACKING_URI_VAR) {
            env.insert(TRACKING_URI_VAR.to_string(), uri);
            if !lineage.namespace.is_empty() {
                env.entry(WORKSPACE_VAR.to_string()).or_insert_with(|| lineage.namespace.clone());
            }
        }
    }
    if !env.contains_key(RUN_CONTEXT_VAR) {
        match serde_json::to_string(&lineage.tags()) {
            Ok(json) => {
                env.insert(RUN_CONTEXT_VAR.to_string(), json);
            }
            Err(e) => tracing::warn!(error = %e, "encoding the run context failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_parses() {
        assert_eq!(TrackingMode::parse("none"), Ok(TrackingMode::Off));
        assert_eq!(TrackingMode::parse("http://10.0.0.1:7646/"), Ok(TrackingMode::Fixed("http://10.0.0.1:7646".into())));
        assert_eq!(TrackingMode::parse("https://mlflow.example"), Ok(TrackingMode::Fixed("https://mlflow.example".into())));
        for bad in ["", "10.0.0.1:7646", "ftp://x", "http://", "http:///x", "http://a b", "http://a\nb"] {
            assert!(TrackingMode::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(TrackingMode::parse(&format!("http://{}", "a".repeat(3000))).is_err());
    }

    #[test]
    fn the_servers_uri_is_learned_unless_fixed_or_off() {
        let t = TrackingUri::new(TrackingMode::FromServers);
        assert_eq!(t.current(), None);
        t.learn("http://127.0.0.1:7646/");
        assert_eq!(t.current().as_deref(), Some("http://127.0.0.1:7646"));
        // A clone (a task runner's) sees what the registration loop learns later.
        let seen = t.clone();
        t.learn("http://10.1.2.3:7646");
        assert_eq!(seen.current().as_deref(), Some("http://10.1.2.3:7646"));
        t.learn("not a uri");
        assert_eq!(seen.current().as_deref(), Some("http://10.1.2.3:7646"), "a bad URI is ignored");
        t.learn("");
        assert_eq!(seen.current(), None);

        let fixed = TrackingUri::new(TrackingMode::Fixed("http://mine:5000".into()));
        fixed.learn("http://127.0.0.1:7646");
        assert_eq!(fixed.current().as_deref(), Some("http://mine:5000"));
        let off = TrackingUri::new(TrackingMode::Off);
        off.learn("http://127.0.0.1:7646");
        assert_eq!(off.current(), None);
    }

    #[test]
    fn the_task_env_gets_both_variables_unless_it_sets_them() -> Result<(), serde_json::Error> {
        let lineage = Lineage {
            job: "train".into(),
            job_version: 3,
            namespace: "default".into(),
            group: "g".into(),
            alloc_id: "a-1".into(),
            alloc_name: "train.g[0]".into(),
            task: "t".into(),
            node_id: "n-1".into(),
        };
        let mut env = BTreeMap::new();
        add_task_env(&mut env, Some("http://s:7646".into()), &lineage);
        assert_eq!(env.get(TRACKING_URI_VAR).map(String::as_str), Some("http://s:7646"));
        let tags: BTreeMap<String, String> = serde_json::from_str(&env[RUN_CONTEXT_VAR])?;
        assert_eq!(tags.get("mlp.job").map(String::as_str), Some("train"));
        assert_eq!(tags.get("mlp.job_version").map(String::as_str), Some("3"));
        assert_eq!(tags.get("mlp.alloc").map(String::as_str), Some("a-1"));
        assert_eq!(tags.get("mlp.node").map(String::as_str), Some("n-1"));
        assert_eq!(tags.len(), 8);
        assert_eq!(env.get(WORKSPACE_VAR).map(String::as_str), Some("default"), "the job's namespace is the workspace");
        let mut theirs_ws = BTreeMap::from([(WORKSPACE_VAR.to_string(), "other".to_string())]);
        add_task_env(&mut theirs_ws, Some("http://s:7646".into()), &lineage);
        assert_eq!(theirs_ws[WORKSPACE_VAR], "other");

        let mut own = BTreeMap::from([
            (TRACKING_URI_VAR.to_string(), "http://theirs:5000".to_string()),
            (RUN_CONTEXT_VAR.to_string(), "{}".to_string()),
        ]);
        add_task_env(&mut own, Some("http://s:7646".into()), &lineage);
        assert_eq!(own[TRACKING_URI_VAR], "http://theirs:5000");
        assert_eq!(own[RUN_CONTEXT_VAR], "{}");
        assert!(!own.contains_key(WORKSPACE_VAR), "their own server may have no workspaces");

        let mut off = BTreeMap::new();
        add_task_env(&mut off, None, &lineage);
        assert!(!off.contains_key(TRACKING_URI_VAR));
        assert!(off.contains_key(RUN_CONTEXT_VAR));
        assert!(!off.contains_key(WORKSPACE_VAR));
        Ok(())
    }
}
