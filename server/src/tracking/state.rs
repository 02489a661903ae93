//! The replicated tracking state and the commands that change it. `apply` is deterministic:
//! everything random or clock-derived (ids, run names, timestamps) is chosen by the proposer
//! and carried in the command or in the entry's `now_ms`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::points::PendingPoints;
use super::TrackingError;

pub const LIFECYCLE_ACTIVE: &str = "active";
pub const LIFECYCLE_DELETED: &str = "deleted";
/// The experiment every cluster starts with (MLflow's "Default", id 0).
pub const DEFAULT_EXPERIMENT_ID: &str = "0";
/// The tag MLflow keeps equal to a run's name.
pub const RUN_NAME_TAG: &str = "mlflow.runName";
pub const RUN_STATUSES: [&str; 5] = ["RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED"];

/// A metric's value: any double. Non-finite values are written as MLflow's JSON does
/// (`"NaN"`, `"Infinity"`, `"-Infinity"`), so that snapshots (serde_json) keep them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricValue(pub f64);

impl Serialize for MetricValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = self.0;
        if v.is_finite() {
            s.serialize_f64(v)
        } else if v.is_nan() {
            s.serialize_str("NaN")
        } else if v > 0.0 {
            s.serialize_str("Infinity")
        } else {
            s.serialize_str("-Infinity")
        }
    }
}

impl<'de> Deserialize<'de> for MetricValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(f64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(v) => Ok(MetricValue(v)),
            Raw::S(s) => parse_metric_value(&s).map(MetricValue).ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not a number"))),
        }
    }
}

/// A metric value written as a string (`"NaN"`, `"Infinity"`, `"1.5"`).
pub fn parse_metric_value(s: &str) -> Option<f64> {
    match s.trim() {
        "NaN" | "nan" => Some(f64::NAN),
        "Infinity" | "inf" | "+Infinity" => Some(f64::INFINITY),
        "-Infinity" | "-inf" => Some(f64::NEG_INFINITY),
        t => t.parse().ok(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MetricPoint {
    pub value: MetricValue,
    pub timestamp: i64,
    pub step: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metric {
    pub key: String,
    pub value: MetricValue,
    pub timestamp: i64,
    pub step: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Experiment {
    pub experiment_id: String,
    pub name: String,
    pub artifact_location: String,
    pub lifecycle_stage: String,
    pub creation_time: i64,
    pub last_update_time: i64,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Run {
    pub run_id: String,
    pub experiment_id: String,
    pub run_name: String,
    pub user_id: String,
    pub status: String,
    pub start_time: i64,
    pub end_time: Option<i64>,
    pub artifact_uri: String,
    pub lifecycle_stage: String,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The latest point per key (MLflow's `latest_metrics`): what search, `runs/get` and the
    /// CLI show. The whole history is on disk (`tracking::points`), not here.
    #[serde(default)]
    pub latest_metrics: BTreeMap<String, MetricPoint>,
    /// When the run was deleted (the entry's time), for the tracking GC; `None` while active
    /// and for runs deleted before this was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_time: Option<i64>,
    /// Every point, per key, as snapshots written before the points moved to disk held them.
    /// Only read: moved into the points tree when such a snapshot is loaded
    /// (`TrackingState::take_legacy_points`), never written.
    #[serde(default, rename = "metrics", skip_serializing)]
    pub legacy_metrics: BTreeMap<String, Vec<MetricPoint>>,
}

/// MLflow's order of a metric's points for "latest": the largest step, then the latest
/// timestamp, then the largest value.
fn later(a: &MetricPoint, b: &MetricPoint) -> std::cmp::Ordering {
    (a.step, a.timestamp).cmp(&(b.step, b.timestamp)).then(a.value.0.total_cmp(&b.value.0))
}

impl Run {
    /// A metric's latest point (see [`later`]).
    pub fn latest(&self, key: &str) -> Option<&MetricPoint> {
        self.latest_metrics.get(key)
    }

    /// Keeps `p` as `key`'s latest point if it is later than the one kept.
    fn observe(&mut self, key: &str, p: &MetricPoint) {
        match self.latest_metrics.get_mut(key) {
            Some(cur) if later(p, cur).is_ge() => *cur = p.clone(),
            Some(_) => {}
            None => {
                self.latest_metrics.insert(key.to_string(), p.clone());
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ModelVersion {
    pub version: u64,
    pub creation_timestamp: i64,
    pub last_updated_timestamp: i64,
    pub description: String,
    pub source: String,
    pub run_id: String,
    pub run_link: String,
    pub current_stage: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The create request that made it (`TrackingCommand::CreateModelVersion::request_id`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegisteredModel {
    pub name: String,
    pub creation_timestamp: i64,
    pub last_updated_timestamp: i64,
    pub description: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Alias -> version.
    #[serde(default)]
    pub aliases: BTreeMap<String, u64>,
    #[serde(default)]
    pub versions: BTreeMap<u64, ModelVersion>,
    /// The last version number handed out (numbers are never reused).
    #[serde(default)]
    pub last_version: u64,
}

/// Everything tracking keeps in the replicated state (`ClusterState::tracking`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TrackingState {
    pub experiments: BTreeMap<String, Experiment>,
    pub runs: BTreeMap<String, Run>,
    pub models: BTreeMap<String, RegisteredModel>,
    /// Every artifact's path → blob (issue 17 §2; `super::artifacts`). Absent in older snapshots.
    #[serde(default)]
    pub artifacts: super::artifacts::ArtifactIndex,
}

impl Default for TrackingState {
    fn default() -> Self {
        let default = Experiment {
            experiment_id: DEFAULT_EXPERIMENT_ID.into(),
            name: "Default".into(),
            artifact_location: artifact_location_for(DEFAULT_EXPERIMENT_ID),
            lifecycle_stage: LIFECYCLE_ACTIVE.into(),
            creation_time: 0,
            last_update_time: 0,
            tags: BTreeMap::new(),
        };
        TrackingState {
            experiments: BTreeMap::from([(DEFAULT_EXPERIMENT_ID.to_string(), default)]),
            runs: BTreeMap::new(),
            models: BTreeMap::new(),
            artifacts: Default::default(),
        }
    }
}

/// Where an experiment's artifacts go when its creator names no location: through mlp's own
/// artifact endpoints, so clients need no object-store credentials.
pub fn artifact_location_for(experiment_id: &str) -> String {
    format!("mlflow-artifacts:/{experiment_id}")
}

/// The tracking changes committed through Raft (`Command::Tracking`). New variants go last so
/// that older logs still decode.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum TrackingCommand {
    CreateExperiment {
        experiment_id: String,
        name: String,
        artifact_location: String,
        tags: Vec<(String, String)>,
    },
    RenameExperiment {
        experiment_id: String,
        new_name: String,
    },
    DeleteExperiment {
        experiment_id: String,
    },
    RestoreExperiment {
        experiment_id: String,
    },
    SetExperimentTag {
        experiment_id: String,
        key: String,
        value: String,
    },
    CreateRun {
        run_id: String,
        experiment_id: String,
        run_name: String,
        user_id: String,
        start_time: i64,
        tags: Vec<(String, String)>,
    },
    UpdateRun {
        run_id: String,
        status: Option<String>,
        end_time: Option<i64>,
        run_name: Option<String>,
    },
    DeleteRun {
        run_id: String,
    },
    RestoreRun {
        run_id: String,
    },
    /// log-metric, log-parameter, set-tag and log-batch: all or nothing.
    LogBatch {
        run_id: String,
        metrics: Vec<Metric>,
        params: Vec<(String, String)>,
        tags: Vec<(String, String)>,
    },
    DeleteRunTag {
        run_id: String,
        key: String,
    },
    CreateRegisteredModel {
        name: String,
        description: String,
        tags: Vec<(String, String)>,
    },
    RenameRegisteredModel {
        name: String,
        new_name: String,
    },
    UpdateRegisteredModel {
        name: String,
        description: String,
    },
    DeleteRegisteredModel {
        name: String,
    },
    SetRegisteredModelTag {
        name: String,
        key: String,
        value: String,
    },
    DeleteRegisteredModelTag {
        name: String,
        key: String,
    },
    SetAlias {
        name: String,
        alias: String,
        version: u64,
    },
    DeleteAlias {
        name: String,
        alias: String,
    },
    /// Answers the new version's number.
    CreateModelVersion {
        name: String,
        source: String,
        run_id: String,
        run_link: String,
        description: String,
        tags: Vec<(String, String)>,
        /// Chosen by the proposer, once per client request: the same entry applied again (a
        /// forwarding retry resends it) answers the version it created instead of adding one.
        /// Absent in older entries.
        #[serde(default)]
        request_id: String,
    },
    UpdateModelVersion {
        name: String,
        version: u64,
        description: String,
    },
    DeleteModelVersion {
        name: String,
        version: u64,
    },
    SetModelVersionTag {
        name: String,
        version: u64,
        key: String,
        value: String,
    },
    DeleteModelVersionTag {
        name: String,
        version: u64,
        key: String,
    },
    /// An uploaded artifact: `path` now names the blob `sha256` (already on a quorum of servers
    /// or in the object store), replacing what was there (issue 17 §2).
    PutArtifact {
        path: String,
        sha256: String,
        size: u64,
    },
    /// Removes the artifact at `path`, or every artifact under it.
    DeleteArtifacts {
        path: String,
    },
    /// The tracking GC (`leader::gc`): runs deleted at least `older_than_ms` before the entry's
    /// time go for good, with their params, tags and metric points. A run restored since the
    /// leader chose it (or deleted again more recently) is skipped. Answers how many went.
    PurgeRuns {
        run_ids: Vec<String>,
        older_than_ms: i64,
    },
    /// The tracking GC: experiments deleted at least `older_than_ms` before the entry's time go
    /// for good, with all their runs (whatever their stage). Answers how many runs went.
    PurgeExperiments {
        experiment_ids: Vec<String>,
        older_than_ms: i64,
    },
}

fn run_not_found(id: &str) -> TrackingError {
    TrackingError::not_found(format!("Run with id={id} not found"))
}

fn model_not_found(name: &str) -> TrackingError {
    TrackingError::not_found(format!("Registered Model with name={name} not found"))
}

impl TrackingState {
    pub fn experiment(&self, id: &str) -> Result<&Experiment, TrackingError> {
        self.experiments.get(id).ok_or_else(|| TrackingError::not_found(format!("No Experiment with id={id} exists")))
    }

    pub fn experiment_by_name(&self, name: &str) -> Option<&Experiment> {
        self.experiments.values().find(|e| e.name == name)
    }

    pub fn run(&self, id: &str) -> Result<&Run, TrackingError> {
        self.runs.get(id).ok_or_else(|| run_not_found(id))
    }

    pub fn model(&self, name: &str) -> Result<&RegisteredModel, TrackingError> {
        self.models.get(name).ok_or_else(|| model_not_found(name))
    }

    pub fn model_version(&self, name: &str, version: u64) -> Result<&ModelVersion, TrackingError> {
        self.model(name)?
            .versions
            .get(&version)
            .ok_or_else(|| TrackingError::not_found(format!("Model Version (name={name}, version={version}) not found")))
    }

    fn experiment_mut(&mut self, id: &str) -> Result<&mut Experiment, TrackingError> {
        self.experiments.get_mut(id).ok_or_else(|| TrackingError::not_found(format!("No Experiment with id={id} exists")))
    }

    fn active_run_mut(&mut self, id: &str) -> Result<&mut Run, TrackingError> {
        let run = self.runs.get_mut(id).ok_or_else(|| run_not_found(id))?;
        if run.lifecycle_stage != LIFECYCLE_ACTIVE {
            return Err(TrackingError::invalid(format!(
                "The run {id} must be in the 'active' state. Current state is {}.",
                run.lifecycle_stage
            )));
        }
        Ok(run)
    }

    fn model_mut(&mut self, name: &str) -> Result<&mut RegisteredModel, TrackingError> {
        self.models.get_mut(name).ok_or_else(|| model_not_found(name))
    }

    fn version_mut(&mut self, name: &str, version: u64) -> Result<&mut ModelVersion, TrackingError> {
        self.model_mut(name)?
            .versions
            .get_mut(&version)
            .ok_or_else(|| TrackingError::not_found(format!("Model Version (name={name}, version={version}) not found")))
    }

    /// Applies one command of the entry at `index`, at the entry's time `now` (the proposer's
    /// clock). Metric points and purges go to `points` (written to the points tree with the
    /// entry). On error nothing changed. `Ok(Some(x))`: what the command created (a model
    /// version's number).
    pub fn apply(
        &mut self,
        index: u64,
        now: i64,
        cmd: &TrackingCommand,
        points: &mut PendingPoints,
    ) -> Result<Option<String>, TrackingError> {
        use TrackingCommand as C;
        match cmd {
            C::CreateExperiment { experiment_id, name, artifact_location, tags } => {
                // The same entry again (a forwarding retry resends it): already done.
                if self.experiments.get(experiment_id).is_some_and(|e| &e.name == name) {
                    return Ok(None);
                }
                if self.experiment_by_name(name).is_some() {
                    return Err(TrackingError::exists(format!("Experiment '{name}' already exists.")));
                }
                if self.experiments.contains_key(experiment_id) {
                    return Err(TrackingError::exists(format!("Experiment with id={experiment_id} already exists.")));
                }
                let location = if artifact_location.is_empty() { artifact_location_for(experiment_id) } else { artifact_location.clone() };
                let e = Experiment {
                    experiment_id: experiment_id.clone(),
                    name: name.clone(),
                    artifact_location: location,
                    lifecycle_stage: LIFECYCLE_ACTIVE.into(),
                    creation_time: now,
                    last_update_time: now,
                    tags: tags.iter().cloned().collect(),
                };
                self.experiments.insert(experiment_id.clone(), e);
            }
            C::RenameExperiment { experiment_id, new_name } => {
                if self.experiment_by_name(new_name).is_some_and(|e| &e.experiment_id != experiment_id) {
                    return Err(TrackingError::exists(format!("Experiment '{new_name}' already exists.")));
                }
                let e = self.experiment_mut(experiment_id)?;
                if e.lifecycle_stage != LIFECYCLE_ACTIVE {
                    return Err(TrackingError::invalid("Cannot rename a non-active experiment."));
                }
                e.name = new_name.clone();
                e.last_update_time = now;
            }
            C::DeleteExperiment { experiment_id } => {
                let e = self.experiment_mut(experiment_id)?;
                e.lifecycle_stage = LIFECYCLE_DELETED.into();
                e.last_update_time = now;
            }
            C::RestoreExperiment { experiment_id } => {
                let e = self.experiment_mut(experiment_id)?;
                e.lifecycle_stage = LIFECYCLE_ACTIVE.into();
                e.last_update_time = now;
            }
            C::SetExperimentTag { experiment_id, key, value } => {
                let e = self.experiment_mut(experiment_id)?;
                if e.lifecycle_stage != LIFECYCLE_ACTIVE {
                    return Err(TrackingError::invalid(format!("The experiment {experiment_id} must be in the 'active' state.")));
                }
                e.tags.insert(key.clone(), value.clone());
            }
            C::CreateRun { run_id, experiment_id, run_name, user_id, start_time, tags } => {
                let e = self.experiment(experiment_id)?;
                if e.lifecycle_stage != LIFECYCLE_ACTIVE {
                    return Err(TrackingError::invalid(format!(
                        "The experiment {experiment_id} must be in the 'active' state. Current state is {}.",
                        e.lifecycle_stage
                    )));
                }
                if let Some(run) = self.runs.get(run_id) {
                    if &run.experiment_id == experiment_id && run.start_time == *start_time {
                        // The same entry again (a forwarding retry): already done.
                        return Ok(None);
                    }
                    return Err(TrackingError::exists(format!("Run with id={run_id} already exists")));
                }
                let artifact_uri = format!("{}/{run_id}/artifacts", e.artifact_location.trim_end_matches('/'));
                let mut tags: BTreeMap<String, String> = tags.iter().cloned().collect();
                tags.insert(RUN_NAME_TAG.into(), run_name.clone());
                let run = Run {
                    run_id: run_id.clone(),
                    experiment_id: experiment_id.clone(),
                    run_name: run_name.clone(),
                    user_id: user_id.clone(),
                    status: "RUNNING".into(),
                    start_time: *start_time,
                    end_time: None,
                    artifact_uri,
                    lifecycle_stage: LIFECYCLE_ACTIVE.into(),
                    params: BTreeMap::new(),
                    tags,
                    latest_metrics: BTreeMap::new(),
                    deleted_time: None,
                    legacy_metrics: BTreeMap::new(),
                };
                self.runs.insert(run_id.clone(), run);
            }
            C::UpdateRun { run_id, status, end_time, run_name } => {
                let run = self.active_run_mut(run_id)?;
                if let Some(s) = status {
                    run.status = s.clone();
                }
                if end_time.is_some() {
                    run.end_time = *end_time;
                }
                if let Some(n) = run_name.as_ref().filter(|n| !n.is_empty()) {
                    run.run_name = n.clone();
                    run.tags.insert(RUN_NAME_TAG.into(), n.clone());
                }
            }
            C::DeleteRun { run_id } => {
                let run = self.runs.get_mut(run_id).ok_or_else(|| run_not_found(run_id))?;
                if run.lifecycle_stage != LIFECYCLE_DELETED {
                    run.deleted_time = Some(now);
                }
                run.lifecycle_stage = LIFECYCLE_DELETED.into();
            }
            C::RestoreRun { run_id } => {
                let run = self.runs.get_mut(run_id).ok_or_else(|| run_not_found(run_id))?;
                run.lifecycle_stage = LIFECYCLE_ACTIVE.into();
                run.deleted_time = None;
            }
            C::LogBatch { run_id, metrics, params, tags } => {
                let run = self.active_run_mut(run_id)?;
                // Check everything first: a refused batch changes nothing.
                let mut batch: BTreeMap<&str, &str> = BTreeMap::new();
                for (k, v) in params {
                    let old = run.params.get(k).map(String::as_str).or_else(|| batch.get(k.as_str()).copied());
                    if let Some(old) = old.filter(|old| *old != v) {
                        return Err(TrackingError::invalid(format!(
                            "Changing param values is not allowed. Param with key='{k}' was already logged with value='{old}' \
                             for run ID='{run_id}'. Attempted logging new value '{v}'."
                        )));
                    }
                    batch.insert(k, v);
                }
                for (k, v) in params {
                    run.params.insert(k.clone(), v.clone());
                }
                for m in metrics {
                    let p = MetricPoint { value: m.value, timestamp: m.timestamp, step: m.step };
                    points.put(index, run_id, &m.key, &p);
                    run.observe(&m.key, &p);
                }
                for (k, v) in tags {
                    if k == RUN_NAME_TAG && !v.is_empty() {
                        run.run_name = v.clone();
                    }
                    run.tags.insert(k.clone(), v.clone());
                }
            }
            C::DeleteRunTag { run_id, key } => {
                let run = self.active_run_mut(run_id)?;
                if run.tags.remove(key).is_none() {
                    return Err(TrackingError::not_found(format!("No tag with name: {key} in run with id {run_id}")));
                }
            }
            C::CreateRegisteredModel { name, description, tags } => {
                if self.models.contains_key(name) {
                    return Err(TrackingError::exists(format!("Registered Model (name={name}) already exists.")));
                }
                let m = RegisteredModel {
                    name: name.clone(),
                    creation_timestamp: now,
                    last_updated_timestamp: now,
                    description: description.clone(),
                    tags: tags.iter().cloned().collect(),
                    aliases: BTreeMap::new(),
                    versions: BTreeMap::new(),
                    last_version: 0,
                };
                self.models.insert(name.clone(), m);
            }
            C::RenameRegisteredModel { name, new_name } => {
                if name != new_name && self.models.contains_key(new_name) {
                    return Err(TrackingError::exists(format!("Registered Model (name={new_name}) already exists.")));
                }
                let mut m = self.models.remove(name).ok_or_else(|| model_not_found(name))?;
                m.name = new_name.clone();
                m.last_updated_timestamp = now;
                self.models.insert(new_name.clone(), m);
            }
            C::UpdateRegisteredModel { name, description } => {
                let m = self.model_mut(name)?;
                m.description = description.clone();
                m.last_updated_timestamp = now;
            }
            C::DeleteRegisteredModel { name } => {
                self.models.remove(name).ok_or_else(|| model_not_found(name))?;
            }
            C::SetRegisteredModelTag { name, key, value } => {
                self.model_mut(name)?.tags.insert(key.clone(), value.clone());
            }
            C::DeleteRegisteredModelTag { name, key } => {
                self.model_mut(name)?.tags.remove(key);
            }
            C::SetAlias { name, alias, version } => {
                self.model_version(name, *version)?;
                let m = self.model_mut(name)?;
                m.aliases.insert(alias.clone(), *version);
            }
            C::DeleteAlias { name, alias } => {
                self.model_mut(name)?.aliases.remove(alias);
            }
            C::CreateModelVersion { name, source, run_id, run_link, description, tags, request_id } => {
                let m = self.model_mut(name)?;
                if !request_id.is_empty() {
                    if let Some(v) = m.versions.values().find(|v| &v.request_id == request_id) {
                        return Ok(Some(v.version.to_string()));
                    }
                }
                m.last_version += 1;
                let version = m.last_version;
                m.last_updated_timestamp = now;
                m.versions.insert(
                    version,
                    ModelVersion {
                        version,
                        creation_timestamp: now,
                        last_updated_timestamp: now,
                        description: description.clone(),
                        source: source.clone(),
                        run_id: run_id.clone(),
                        run_link: run_link.clone(),
                        current_stage: "None".into(),
                        tags: tags.iter().cloned().collect(),
                        request_id: request_id.clone(),
                    },
                );
                return Ok(Some(version.to_string()));
            }
            C::UpdateModelVersion { name, version, description } => {
                let v = self.version_mut(name, *version)?;
                v.description = description.clone();
                v.last_updated_timestamp = now;
            }
            C::DeleteModelVersion { name, version } => {
                self.model_version(name, *version)?;
                let m = self.model_mut(name)?;
                m.versions.remove(version);
                m.aliases.retain(|_, v| v != version);
                m.last_updated_timestamp = now;
            }
            C::SetModelVersionTag { name, version, key, value } => {
                self.version_mut(name, *version)?.tags.insert(key.clone(), value.clone());
            }
            C::DeleteModelVersionTag { name, version, key } => {
                self.version_mut(name, *version)?.tags.remove(key);
            }
            C::PutArtifact { path, sha256, size } => {
                self.artifacts.apply_put(path, sha256, *size)?;
            }
            C::DeleteArtifacts { path } => {
                self.artifacts.apply_delete(path)?;
            }
            C::PurgeRuns { run_ids, older_than_ms } => {
                let mut purged = 0u64;
                for id in run_ids {
                    if self.runs.get(id).is_some_and(|r| run_purgeable(r, now, *older_than_ms)) {
                        self.purge_run(id, points);
                        purged += 1;
                    }
                }
                return Ok(Some(purged.to_string()));
            }
            C::PurgeExperiments { experiment_ids, older_than_ms } => {
                let mut purged = 0u64;
                for id in experiment_ids {
                    if !self.experiments.get(id).is_some_and(|e| experiment_purgeable(e, now, *older_than_ms)) {
                        continue;
                    }
                    let runs: Vec<String> = self.runs.values().filter(|r| &r.experiment_id == id).map(|r| r.run_id.clone()).collect();
                    for r in runs {
                        self.purge_run(&r, points);
                        purged += 1;
                    }
                    // Artifacts logged under the experiment but outside any run's directory.
                    if let Some(e) = self.experiments.remove(id) {
                        self.artifacts.remove_run(&e.artifact_location);
                    }
                }
                return Ok(Some(purged.to_string()));
            }
        }
        Ok(None)
    }

    /// Removes a run for good: the run with its params and tags here, its metric points from
    /// the points tree (through `points`, with the entry), and the artifacts under its artifact
    /// URI from the replicated index (their blobs go with the next GC sweep). THE one place a
    /// run goes: whatever else refers to a run's data must be dropped here too.
    pub fn purge_run(&mut self, run_id: &str, points: &mut PendingPoints) {
        if let Some(run) = self.runs.remove(run_id) {
            points.remove_run(run_id);
            self.artifacts.remove_run(&run.artifact_uri);
        }
    }

    /// What the tracking GC may purge at `now`: runs deleted at least `older_than_ms` ago (not
    /// in a purgeable experiment: those go with it) and experiments deleted that long ago.
    pub fn purge_candidates(&self, now: i64, older_than_ms: i64) -> (Vec<String>, Vec<String>) {
        let experiments: Vec<String> =
            self.experiments.values().filter(|e| experiment_purgeable(e, now, older_than_ms)).map(|e| e.experiment_id.clone()).collect();
        let runs = self
            .runs
            .values()
            .filter(|r| run_purgeable(r, now, older_than_ms) && !experiments.contains(&r.experiment_id))
            .map(|r| r.run_id.clone())
            .collect();
        (runs, experiments)
    }

    /// Moves the points of runs loaded from a snapshot written before points moved to disk
    /// (`Run::legacy_metrics`) out of the state: each run's latest values are set from them, and
    /// the points come back in `points` as the entry at index 0 wrote them (so they sort
    /// before any point logged since, in their logged order).
    pub fn take_legacy_points(&mut self, points: &mut PendingPoints) -> usize {
        // Their own numbering (index 0, seq counting from 0), whatever entry is being applied.
        let mut legacy = PendingPoints::default();
        for run in self.runs.values_mut() {
            for (key, history) in std::mem::take(&mut run.legacy_metrics) {
                for p in &history {
                    legacy.put(0, &run.run_id, &key, p);
                    run.observe(&key, p);
                }
            }
        }
        let n = legacy.ops.len();
        points.ops.append(&mut legacy.ops);
        n
    }
}

/// Deleted at least `older_than_ms` before `now`. A run deleted before deletion times were
/// recorded counts from its end (or start) time.
fn run_purgeable(r: &Run, now: i64, older_than_ms: i64) -> bool {
    let since = r.deleted_time.unwrap_or(r.end_time.unwrap_or(r.start_time));
    r.lifecycle_stage == LIFECYCLE_DELETED && now.saturating_sub(since) >= older_than_ms
}

/// Deleted at least `older_than_ms` before `now` (a deleted experiment changes no more, so its
/// last update is its deletion); the Default experiment always stays.
fn experiment_purgeable(e: &Experiment, now: i64, older_than_ms: i64) -> bool {
    e.experiment_id != DEFAULT_EXPERIMENT_ID
        && e.lifecycle_stage == LIFECYCLE_DELETED
        && now.saturating_sub(e.last_update_time) >= older_than_ms
}

// ---- MLflow's JSON views ----

fn tags_json(tags: &BTreeMap<String, String>) -> Value {
    Value::Array(tags.iter().map(|(k, v)| json!({ "key": k, "value": v })).collect())
}

pub fn metric_json(key: &str, p: &MetricPoint) -> Value {
    json!({ "key": key, "value": p.value, "timestamp": p.timestamp, "step": p.step })
}

impl Experiment {
    pub fn to_json(&self) -> Value {
        json!({
            "experiment_id": self.experiment_id,
            "name": self.name,
            "artifact_location": self.artifact_location,
            "lifecycle_stage": self.lifecycle_stage,
            "creation_time": self.creation_time,
            "last_update_time": self.last_update_time,
            "tags": tags_json(&self.tags),
        })
    }
}

impl Run {
    pub fn info_json(&self) -> Value {
        serde_json::to_value(RunInfoOut(self)).unwrap_or(Value::Null)
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(RunOut(self)).unwrap_or(Value::Null)
    }
}

/// A run as MLflow's JSON writes it (`{"data", "info", "inputs"}`), serialized straight from
/// the state: `runs/search` writes thousands of these, and building a `serde_json::Value` tree
/// per run first was most of its time (allocations and frees, perf). Keys come in the order
/// `serde_json::Value` sorts them, so both paths write the same bytes.
pub struct RunOut<'a>(pub &'a Run);

struct RunInfoOut<'a>(&'a Run);

/// `[{"key": K, "value": V}, ...]`.
struct KeyValues<'a>(&'a BTreeMap<String, String>);

/// `[{"key", "step", "timestamp", "value"}, ...]`: the latest point per key.
struct LatestMetrics<'a>(&'a BTreeMap<String, MetricPoint>);

impl Serialize for RunOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        struct Data<'a>(&'a Run);
        impl Serialize for Data<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(3))?;
                m.serialize_entry("metrics", &LatestMetrics(&self.0.latest_metrics))?;
                m.serialize_entry("params", &KeyValues(&self.0.params))?;
                m.serialize_entry("tags", &KeyValues(&self.0.tags))?;
                m.end()
            }
        }
        let mut m = s.serialize_map(Some(3))?;
        m.serialize_entry("data", &Data(self.0))?;
        m.serialize_entry("info", &RunInfoOut(self.0))?;
        m.serialize_entry("inputs", &serde_json::Map::new())?;
        m.end()
    }
}

impl Serialize for RunInfoOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let r = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("artifact_uri", &r.artifact_uri)?;
        if let Some(end) = r.end_time {
            m.serialize_entry("end_time", &end)?;
        }
        m.serialize_entry("experiment_id", &r.experiment_id)?;
        m.serialize_entry("lifecycle_stage", &r.lifecycle_stage)?;
        m.serialize_entry("run_id", &r.run_id)?;
        m.serialize_entry("run_name", &r.run_name)?;
        m.serialize_entry("run_uuid", &r.run_id)?;
        m.serialize_entry("start_time", &r.start_time)?;
        m.serialize_entry("status", &r.status)?;
        m.serialize_entry("user_id", &r.user_id)?;
        m.end()
    }
}

impl Serialize for KeyValues<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        struct Kv<'a>(&'a str, &'a str);
        impl Serialize for Kv<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("key", self.0)?;
                m.serialize_entry("value", self.1)?;
                m.end()
            }
        }
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for (k, v) in self.0 {
            seq.serialize_element(&Kv(k, v))?;
        }
        seq.end()
    }
}

impl Serialize for LatestMetrics<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        struct Point<'a>(&'a str, &'a MetricPoint);
        impl Serialize for Point<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(4))?;
                m.serialize_entry("key", self.0)?;
                m.serialize_entry("step", &self.1.step)?;
                m.serialize_entry("timestamp", &self.1.timestamp)?;
                m.serialize_entry("value", &self.1.value)?;
                m.end()
            }
        }
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for (k, p) in self.0 {
            seq.serialize_element(&Point(k, p))?;
        }
        seq.end()
    }
}

impl ModelVersion {
    pub fn to_json(&self, model: &RegisteredModel) -> Value {
        let aliases: Vec<&String> = model.aliases.iter().filter(|(_, v)| **v == self.version).map(|(a, _)| a).collect();
        json!({
            "name": model.name,
            "version": self.version.to_string(),
            "creation_timestamp": self.creation_timestamp,
            "last_updated_timestamp": self.last_updated_timestamp,
            "current_stage": self.current_stage,
            "description": self.description,
            "source": self.source,
            "run_id": self.run_id,
            "run_link": self.run_link,
            "status": "READY",
            "tags": tags_json(&self.tags),
            "aliases": aliases,
        })
    }
}

impl RegisteredModel {
    pub fn to_json(&self) -> Value {
        // The latest version per stage, as MLflow reports `latest_versions`.
        let mut latest: BTreeMap<&str, &ModelVersion> = BTreeMap::new();
        for v in self.versions.values() {
            latest.insert(v.current_stage.as_str(), v);
        }
        let latest: Vec<Value> = latest.values().map(|v| v.to_json(self)).collect();
        let aliases: Vec<Value> = self.aliases.iter().map(|(a, v)| json!({ "alias": a, "version": v.to_string() })).collect();
        json!({
            "name": self.name,
            "creation_timestamp": self.creation_timestamp,
            "last_updated_timestamp": self.last_updated_timestamp,
            "description": self.description,
            "latest_versions": latest,
            "tags": tags_json(&self.tags),
            "aliases": aliases,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_written_as_mlflow_writes_it() {
        let run = Run {
            run_id: "r1".into(),
            experiment_id: "7".into(),
            run_name: "name".into(),
            user_id: "u".into(),
            status: "FINISHED".into(),
            start_time: 10,
            end_time: Some(20),
            artifact_uri: "mlflow-artifacts:/7/r1/artifacts".into(),
            lifecycle_stage: "active".into(),
            params: BTreeMap::from([("lr".to_string(), "0.1".to_string())]),
            tags: BTreeMap::from([("a\"b".to_string(), "v".to_string())]),
            latest_metrics: BTreeMap::from([
                ("loss".to_string(), MetricPoint { value: MetricValue(0.5), timestamp: 15, step: 3 }),
                ("nan".to_string(), MetricPoint { value: MetricValue(f64::NAN), timestamp: 16, step: 0 }),
            ]),
            deleted_time: None,
            legacy_metrics: BTreeMap::new(),
        };
        let want = json!({
            "data": {
                "metrics": [
                    { "key": "loss", "step": 3, "timestamp": 15, "value": 0.5 },
                    { "key": "nan", "step": 0, "timestamp": 16, "value": "NaN" },
                ],
                "params": [{ "key": "lr", "value": "0.1" }],
                "tags": [{ "key": "a\"b", "value": "v" }],
            },
            "info": {
                "artifact_uri": "mlflow-artifacts:/7/r1/artifacts", "end_time": 20, "experiment_id": "7",
                "lifecycle_stage": "active", "run_id": "r1", "run_name": "name", "run_uuid": "r1",
                "start_time": 10, "status": "FINISHED", "user_id": "u",
            },
            "inputs": {},
        });
        // The bytes `runs/search` writes, and the `Value` the other endpoints embed.
        let bytes = serde_json::to_vec(&RunOut(&run)).expect("serializes");
        assert_eq!(String::from_utf8(bytes).expect("utf-8"), want.to_string());
        assert_eq!(run.to_json(), want);
        let running = Run { end_time: None, ..run };
        assert!(running.info_json().get("end_time").is_none(), "{}", running.info_json());
    }

    /// Applies `cmd` as the entry at index `now`, its points into `POINTS`' store.
    fn ap(st: &mut TrackingState, now: i64, cmd: &TrackingCommand) -> Result<Option<String>, TrackingError> {
        let mut pending = PendingPoints::default();
        let r = st.apply(now as u64, now, cmd, &mut pending);
        POINTS.with(|p| p.apply(pending.index(), &pending.ops)).expect("points");
        r
    }

    thread_local! {
        static POINTS: crate::tracking::points::PointStore = crate::tracking::points::PointStore::default();
    }

    fn history(run: &str, key: &str) -> Vec<MetricPoint> {
        POINTS.with(|p| p.history(run, key)).expect("history")
    }

    fn create_run(st: &mut TrackingState, id: &str) {
        let c = TrackingCommand::CreateRun {
            run_id: id.into(),
            experiment_id: DEFAULT_EXPERIMENT_ID.into(),
            run_name: "r".into(),
            user_id: "u".into(),
            start_time: 1,
            tags: vec![],
        };
        ap(st, 1, &c).expect("create run");
    }

    fn batch(run: &str, metrics: Vec<Metric>, params: &[(&str, &str)], tags: &[(&str, &str)]) -> TrackingCommand {
        let pairs = |v: &[(&str, &str)]| v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        TrackingCommand::LogBatch { run_id: run.into(), metrics, params: pairs(params), tags: pairs(tags) }
    }

    fn metric(key: &str, value: f64, timestamp: i64, step: i64) -> Metric {
        Metric { key: key.into(), value: MetricValue(value), timestamp, step }
    }

    #[test]
    fn tracking_state_loads_from_older_snapshots_and_commands_keep_their_encoding() {
        let old: crate::state::ClusterState =
            serde_json::from_str(r#"{"jobs":{},"job_versions":{},"evals":{},"allocs":{},"nodes":{},"index":7}"#).expect("old snapshot");
        assert_eq!(old.tracking.experiment(DEFAULT_EXPERIMENT_ID).expect("default").name, "Default");
        let cmd = crate::state::Command::Tracking(TrackingCommand::DeleteRun { run_id: "r".into() });
        let text = serde_json::to_string(&cmd).expect("encode");
        assert_eq!(text, r#"{"Tracking":{"DeleteRun":{"run_id":"r"}}}"#);
        assert_eq!(serde_json::from_str::<crate::state::Command>(&text).expect("decode"), cmd);
        let older: crate::state::Command = serde_json::from_str(r#"{"UpsertEvals":{"evals":[]}}"#).expect("older entries decode");
        assert!(matches!(older, crate::state::Command::UpsertEvals { .. }));
        // Applied through the cluster state, a refusal comes back as `CODE: message`.
        let mut st = crate::state::ClusterState::default();
        let req = crate::state::Request { now_ms: 5, command: cmd };
        let r = st.apply(1, &req, &mut Vec::new());
        let err = super::super::TrackingError::from_wire(r.error.as_deref().expect("refused"));
        assert_eq!(err.code, super::super::ErrorCode::ResourceDoesNotExist, "{err}");
    }

    #[test]
    fn tracking_params_are_immutable_and_a_refused_batch_changes_nothing() {
        let mut st = TrackingState::default();
        create_run(&mut st, "r1");
        ap(&mut st, 2, &batch("r1", vec![], &[("lr", "0.1")], &[])).expect("first");
        // The same value again is fine.
        ap(&mut st, 3, &batch("r1", vec![], &[("lr", "0.1")], &[])).expect("same value");
        let before = st.clone();
        let err = ap(&mut st, 4, &batch("r1", vec![metric("m", 1.0, 1, 0)], &[("lr", "0.2")], &[("t", "x")]))
            .expect_err("a different value is refused");
        assert_eq!(err.code, super::super::ErrorCode::InvalidParameterValue);
        assert!(err.message.contains("Changing param values is not allowed"), "{err}");
        assert_eq!(st, before, "the refused batch must change nothing (no metric, no tag)");
        assert!(history("r1", "m").is_empty(), "nor a point on disk");
        // Two different values for one key inside one batch are refused too.
        let err = ap(&mut st, 5, &batch("r1", vec![], &[("b", "1"), ("b", "2")], &[])).expect_err("conflict inside the batch");
        assert_eq!(err.code, super::super::ErrorCode::InvalidParameterValue);
        assert_eq!(st, before);
    }

    #[test]
    fn tracking_tags_overwrite_and_metric_history_keeps_logged_order() {
        let mut st = TrackingState::default();
        create_run(&mut st, "r1");
        ap(&mut st, 2, &batch("r1", vec![metric("loss", 3.0, 10, 0), metric("loss", 2.0, 11, 1)], &[], &[("t", "a")])).expect("1");
        ap(&mut st, 3, &batch("r1", vec![metric("loss", 5.0, 9, 0), metric("loss", f64::NAN, 12, 2)], &[], &[("t", "b")])).expect("2");
        let run = st.run("r1").expect("run");
        assert_eq!(run.tags.get("t").map(String::as_str), Some("b"));
        let hist: Vec<(i64, i64)> = history("r1", "loss").iter().map(|p| (p.step, p.timestamp)).collect();
        assert_eq!(hist, vec![(0, 10), (1, 11), (0, 9), (2, 12)], "append-only, in logged order");
        let latest = run.latest("loss").expect("latest");
        assert_eq!((latest.step, latest.timestamp), (2, 12));
        assert!(latest.value.0.is_nan());
        // NaN survives a snapshot round trip.
        let text = serde_json::to_string(&st).expect("encode");
        let back: TrackingState = serde_json::from_str(&text).expect("decode");
        assert!(back.run("r1").expect("run").latest("loss").expect("latest").value.0.is_nan());
        // The run name tag renames the run.
        ap(&mut st, 4, &batch("r1", vec![], &[], &[(RUN_NAME_TAG, "renamed")])).expect("3");
        assert_eq!(st.run("r1").expect("run").run_name, "renamed");
    }

    #[test]
    fn tracking_deleted_runs_refuse_logging_and_model_versions_count_up() {
        let mut st = TrackingState::default();
        create_run(&mut st, "r1");
        // A resent create (a forwarding retry) is a no-op, not an error.
        let before = st.clone();
        create_run(&mut st, "r1");
        assert_eq!(st, before);
        ap(&mut st, 2, &TrackingCommand::DeleteRun { run_id: "r1".into() }).expect("delete");
        let err = ap(&mut st, 3, &batch("r1", vec![metric("m", 1.0, 1, 0)], &[], &[])).expect_err("deleted");
        assert_eq!(err.code, super::super::ErrorCode::InvalidParameterValue);
        let err = ap(&mut st, 3, &batch("nope", vec![], &[], &[])).expect_err("missing");
        assert_eq!(err.code, super::super::ErrorCode::ResourceDoesNotExist);

        let create = TrackingCommand::CreateRegisteredModel { name: "m".into(), description: String::new(), tags: vec![] };
        ap(&mut st, 4, &create).expect("model");
        assert_eq!(ap(&mut st, 5, &create).expect_err("twice").code, super::super::ErrorCode::ResourceAlreadyExists);
        let v = TrackingCommand::CreateModelVersion {
            name: "m".into(),
            source: "s".into(),
            run_id: String::new(),
            run_link: String::new(),
            description: String::new(),
            tags: vec![],
            request_id: String::new(),
        };
        assert_eq!(ap(&mut st, 6, &v).expect("v1"), Some("1".into()));
        assert_eq!(ap(&mut st, 7, &v).expect("v2"), Some("2".into()));
        // A retried entry (same request id) answers the version it made; a new request adds one.
        let retried = |id: &str| TrackingCommand::CreateModelVersion {
            name: "m".into(),
            source: "s".into(),
            run_id: String::new(),
            run_link: String::new(),
            description: String::new(),
            tags: vec![],
            request_id: id.into(),
        };
        assert_eq!(ap(&mut st, 70, &retried("r1")).expect("v3"), Some("3".into()));
        assert_eq!(ap(&mut st, 71, &retried("r1")).expect("v3 again"), Some("3".into()), "a retry adds no version");
        assert_eq!(ap(&mut st, 72, &retried("r2")).expect("v4"), Some("4".into()));
        ap(&mut st, 73, &TrackingCommand::DeleteModelVersion { name: "m".into(), version: 4 }).expect("delete v4");
        ap(&mut st, 74, &TrackingCommand::DeleteModelVersion { name: "m".into(), version: 3 }).expect("delete v3");
        ap(&mut st, 8, &TrackingCommand::SetAlias { name: "m".into(), alias: "champion".into(), version: 2 }).expect("alias");
        ap(&mut st, 9, &TrackingCommand::DeleteModelVersion { name: "m".into(), version: 2 }).expect("delete v2");
        assert!(st.model("m").expect("m").aliases.is_empty(), "an alias goes with its version");
        assert_eq!(ap(&mut st, 10, &v).expect("v5"), Some("5".into()), "numbers are not reused");
    }

    #[test]
    fn tracking_purge_removes_deleted_runs_and_their_points_but_not_restored_or_recently_deleted_ones() {
        let mut st = TrackingState::default();
        let exp = TrackingCommand::CreateExperiment {
            experiment_id: "9".into(),
            name: "gone".into(),
            artifact_location: String::new(),
            tags: vec![],
        };
        ap(&mut st, 1, &exp).expect("experiment");
        for id in ["p1", "p2", "p3", "p4"] {
            create_run(&mut st, id);
            ap(&mut st, 2, &batch(id, vec![metric("loss", 1.0, 1, 0), metric("loss", 2.0, 2, 1)], &[("lr", "1")], &[])).expect("log");
        }
        let in_exp = TrackingCommand::CreateRun {
            run_id: "p5".into(),
            experiment_id: "9".into(),
            run_name: "r".into(),
            user_id: "u".into(),
            start_time: 1,
            tags: vec![],
        };
        ap(&mut st, 3, &in_exp).expect("run in experiment");
        ap(&mut st, 4, &batch("p5", vec![metric("loss", 1.0, 1, 0)], &[], &[])).expect("log");
        // Artifacts of runs p1, p2, p5 and one of the experiment outside any run.
        let put = |path: String| TrackingCommand::PutArtifact { path, sha256: "ab".repeat(32), size: 3 };
        let artifact_of = |st: &TrackingState, id: &str| {
            format!("{}/model.bin", super::super::artifacts::path_of_uri(&st.runs[id].artifact_uri).expect("mlp's own store"))
        };
        for id in ["p1", "p2", "p5"] {
            let path = artifact_of(&st, id);
            ap(&mut st, 5, &put(path)).expect("put artifact");
        }
        let exp_note =
            format!("{}/notes.txt", super::super::artifacts::path_of_uri(&st.experiments["9"].artifact_location).expect("own store"));
        ap(&mut st, 5, &put(exp_note.clone())).expect("put experiment artifact");
        let (p1_art, p2_art, p5_art) = (artifact_of(&st, "p1"), artifact_of(&st, "p2"), artifact_of(&st, "p5"));
        let del = |id: &str| TrackingCommand::DeleteRun { run_id: id.into() };
        ap(&mut st, 10, &del("p1")).expect("delete p1");
        ap(&mut st, 10, &del("p2")).expect("delete p2");
        ap(&mut st, 11, &TrackingCommand::RestoreRun { run_id: "p2".into() }).expect("restore p2");
        ap(&mut st, 10, &del("p3")).expect("delete p3");
        ap(&mut st, 10, &TrackingCommand::DeleteExperiment { experiment_id: "9".into() }).expect("delete experiment");
        // At 100 with a threshold of 50: p1, p3 and the experiment (with p5) are due.
        let (runs, exps) = st.purge_candidates(100, 50);
        assert_eq!((runs.clone(), exps.clone()), (vec!["p1".to_string(), "p3".to_string()], vec!["9".to_string()]));
        // p3 is restored and deleted again before the purge commits: too recent now.
        ap(&mut st, 95, &TrackingCommand::RestoreRun { run_id: "p3".into() }).expect("restore p3");
        ap(&mut st, 96, &del("p3")).expect("delete p3 again");
        assert_eq!(
            ap(&mut st, 100, &TrackingCommand::PurgeExperiments { experiment_ids: exps, older_than_ms: 50 }).expect("purge"),
            Some("1".into())
        );
        assert_eq!(ap(&mut st, 100, &TrackingCommand::PurgeRuns { run_ids: runs, older_than_ms: 50 }).expect("purge"), Some("1".into()));
        let left: Vec<&str> = st.runs.keys().map(String::as_str).collect();
        assert_eq!(left, ["p2", "p3", "p4"]);
        assert!(!st.experiments.contains_key("9"));
        assert!(history("p1", "loss").is_empty() && history("p5", "loss").is_empty(), "purged points are gone");
        assert_eq!(history("p2", "loss").len(), 2, "a restored run keeps its points");
        assert_eq!(history("p3", "loss").len(), 2);
        // The purged runs' and experiment's artifacts left the index (their blobs go with GC).
        assert!(st.artifacts.get(&p1_art).is_err() && st.artifacts.get(&p5_art).is_err() && st.artifacts.get(&exp_note).is_err());
        assert!(st.artifacts.get(&p2_art).is_ok(), "a restored run keeps its artifacts");
        // Again (a replayed entry): nothing more goes.
        let again = TrackingCommand::PurgeRuns { run_ids: vec!["p1".into(), "p3".into()], older_than_ms: 50 };
        assert_eq!(ap(&mut st, 100, &again).expect("again"), Some("0".into()));
        // The purge commands keep their encoding (they are the last variants).
        let text = serde_json::to_string(&again).expect("encode");
        assert_eq!(text, r#"{"PurgeRuns":{"run_ids":["p1","p3"],"older_than_ms":50}}"#);
    }
}
