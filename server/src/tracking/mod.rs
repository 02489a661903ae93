//! MLflow tracking and model registry (issue 17): MLflow's REST API served by every server
//! under `/api/2.0/mlflow/...` and `/api/2.0/mlflow-artifacts/...`, so ML code that logs with
//! MLflow's client works with `MLFLOW_TRACKING_URI=http://<server http addr>`.
//!
//! * [`state`]: experiments, runs (params, tags, metric history), registered models, versions
//!   and aliases as replicated cluster state: `Command::Tracking` entries applied through Raft
//!   like jobs (`ClusterState::tracking`). Ids and timestamps come from the proposer.
//! * [`points`]: every metric point, in a sled tree of the Raft database (the state keeps only
//!   each run's latest value per key), carried in Raft snapshots after the state.
//! * [`search`]: MLflow's filter and `order_by` grammar for `runs/search` and friends.
//! * [`http`]: the REST handlers (validation and limits before anything reaches Raft).
//! * [`grpc`]: `TrackingService`, the CLI's views (`mlp run`, `mlp model`).
//! * [`artifacts`]: content-addressed artifact blobs on the server's disk (not replicated yet).

pub mod artifacts;
pub mod grpc;
pub mod http;
pub mod points;
pub mod search;
pub mod state;

pub use state::{TrackingCommand, TrackingState};

/// MLflow's error codes (its `databricks.ErrorCode`), the ones mlp answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidParameterValue,
    ResourceDoesNotExist,
    ResourceAlreadyExists,
    EndpointNotFound,
    TemporarilyUnavailable,
    InternalError,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 6] = [
        ErrorCode::InvalidParameterValue,
        ErrorCode::ResourceDoesNotExist,
        ErrorCode::ResourceAlreadyExists,
        ErrorCode::EndpointNotFound,
        ErrorCode::TemporarilyUnavailable,
        ErrorCode::InternalError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidParameterValue => "INVALID_PARAMETER_VALUE",
            ErrorCode::ResourceDoesNotExist => "RESOURCE_DOES_NOT_EXIST",
            ErrorCode::ResourceAlreadyExists => "RESOURCE_ALREADY_EXISTS",
            ErrorCode::EndpointNotFound => "ENDPOINT_NOT_FOUND",
            ErrorCode::TemporarilyUnavailable => "TEMPORARILY_UNAVAILABLE",
            ErrorCode::InternalError => "INTERNAL_ERROR",
        }
    }

    /// The HTTP status MLflow's server answers this code with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidParameterValue | ErrorCode::ResourceAlreadyExists => 400,
            ErrorCode::ResourceDoesNotExist | ErrorCode::EndpointNotFound => 404,
            ErrorCode::TemporarilyUnavailable => 503,
            ErrorCode::InternalError => 500,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A tracking failure in MLflow's terms. Errors of `apply` travel through Raft as the string
/// `"<CODE>: <message>"` (`CommandResponse.error`) and are parsed back with [`Self::from_wire`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct TrackingError {
    pub code: ErrorCode,
    pub message: String,
}

impl TrackingError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        TrackingError { code, message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidParameterValue, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ResourceDoesNotExist, message)
    }
    pub fn exists(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ResourceAlreadyExists, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InternalError, message)
    }
    /// An MLflow workspace (`X-MLFLOW-WORKSPACE`) that is no mlp namespace.
    pub fn no_workspace(namespace: &str) -> Self {
        Self::not_found(format!("Workspace '{namespace}' does not exist"))
    }

    /// Parses `"<CODE>: <message>"`; anything else is an invalid parameter (the state machine's
    /// other refusals are all about the request).
    pub fn from_wire(s: &str) -> Self {
        if let Some((code, msg)) = s.split_once(": ") {
            if let Some(c) = ErrorCode::ALL.iter().find(|c| c.as_str() == code) {
                return Self::new(*c, msg);
            }
        }
        Self::invalid(s)
    }
}

/// MLflow's limits (`mlflow/utils/validation.py`), checked before anything reaches Raft.
pub mod limits {
    /// Names of experiments, runs, models; keys of params, metrics and tags.
    pub const MAX_NAME_CHARS: usize = 250;
    pub const MAX_PARAM_VALUE_CHARS: usize = 6000;
    pub const MAX_TAG_VALUE_CHARS: usize = 8000;
    pub const MAX_EXPERIMENT_TAG_VALUE_CHARS: usize = 5000;
    pub const MAX_MODEL_TAG_VALUE_CHARS: usize = 5000;
    pub const MAX_DESCRIPTION_CHARS: usize = 65_000;
    /// Artifact locations, sources, URIs, user ids.
    pub const MAX_URI_CHARS: usize = 4096;
    pub const MAX_BATCH_METRICS: usize = 1000;
    pub const MAX_BATCH_PARAMS: usize = 100;
    pub const MAX_BATCH_TAGS: usize = 100;
    pub const MAX_BATCH_ITEMS: usize = 1000;
    /// A request body (log-batch's 1 MB).
    pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
    /// Tags a create request may carry (experiment, run, model, version).
    pub const MAX_CREATE_TAGS: usize = 100;
    pub const MAX_ALIAS_CHARS: usize = 255;
    pub const MAX_FILTER_CHARS: usize = 10_000;
    pub const MAX_SEARCH_RESULTS: usize = 50_000;
}

/// A name or key: present, at most `max` characters, no control characters.
pub fn check_key(what: &str, s: &str, max: usize) -> Result<(), TrackingError> {
    if s.is_empty() {
        return Err(TrackingError::invalid(format!("Missing value for required parameter '{what}'")));
    }
    check_value(what, s, max)?;
    if s.chars().any(char::is_control) {
        return Err(TrackingError::invalid(format!("Invalid value for parameter '{what}': control characters are not allowed")));
    }
    Ok(())
}

/// An alias name MLflow reserves: `latest` and `v<digits>` (any case) name versions themselves.
pub fn check_alias_not_reserved(alias: &str) -> Result<(), TrackingError> {
    let lower = alias.to_ascii_lowercase();
    let versionish = lower.strip_prefix('v').is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
    if lower == "latest" || versionish {
        return Err(TrackingError::invalid(format!("'{alias}' is reserved and cannot be used as an alias")));
    }
    Ok(())
}

/// A value of at most `max` characters.
pub fn check_value(what: &str, s: &str, max: usize) -> Result<(), TrackingError> {
    let n = s.chars().count();
    if n > max {
        return Err(TrackingError::invalid(format!("'{what}' exceeds the maximum length of {max} characters (found {n})")));
    }
    Ok(())
}
