//! `TrackingService`: the CLI's views of runs and models (`mlp run`, `mlp model`; issue 17 §3),
//! read from the same replicated state as MLflow's REST API ([`super::http`]), with the same
//! filter grammar and the same validation; a write (an alias) goes through the same Raft
//! command.

use std::sync::Arc;

use mlp_proto::v1::tracking_service_server::TrackingService;
use mlp_proto::v1::{
    GetModelRequest, GetRunRequest, ListModelsRequest, ListModelsResponse, ListRunsRequest, ListRunsResponse, SetModelAliasRequest,
    TrackedModel, TrackedModelVersion, TrackedRun,
};
use tonic::{Request, Response, Status};

use super::search::{compare, parse_filter, parse_order_by};
use super::state::{RegisteredModel, Run, TrackingCommand, TrackingState, LIFECYCLE_ACTIVE};
use super::{ErrorCode, TrackingError};
use crate::acl::policy::Capability;
use crate::acl::Authz;
use crate::api::Api;

/// Most runs one `ListRuns` answers (the REST search pages beyond).
const MAX_LIST: u32 = 10_000;
/// Longest filter accepted.
const MAX_FILTER: usize = 4096;

/// The service, over the servers' [`Api`].
#[derive(Clone)]
pub struct TrackingGrpc {
    pub api: Arc<Api>,
}

fn status(e: TrackingError) -> Status {
    match e.code {
        ErrorCode::InvalidParameterValue => Status::invalid_argument(e.message),
        ErrorCode::ResourceDoesNotExist | ErrorCode::EndpointNotFound => Status::not_found(e.message),
        ErrorCode::ResourceAlreadyExists => Status::already_exists(e.message),
        ErrorCode::TemporarilyUnavailable => Status::unavailable(e.message),
        ErrorCode::InternalError => Status::internal(e.message),
    }
}

fn run_view(s: &TrackingState, r: &Run) -> TrackedRun {
    TrackedRun {
        run_id: r.run_id.clone(),
        experiment_id: r.experiment_id.clone(),
        experiment_name: s.experiments.get(&r.experiment_id).map(|e| e.name.clone()).unwrap_or_default(),
        name: r.run_name.clone(),
        status: r.status.clone(),
        start_time_ms: r.start_time,
        end_time_ms: r.end_time.unwrap_or(0),
        params: r.params.clone().into_iter().collect(),
        tags: r.tags.clone().into_iter().collect(),
        metrics: r.latest_metrics.iter().map(|(k, p)| (k.clone(), p.value.0)).collect(),
        lifecycle_stage: r.lifecycle_stage.clone(),
    }
}

fn model_view(m: &RegisteredModel) -> TrackedModel {
    TrackedModel {
        name: m.name.clone(),
        description: m.description.clone(),
        tags: m.tags.clone().into_iter().collect(),
        aliases: m.aliases.clone().into_iter().collect(),
        versions: m
            .versions
            .values()
            .rev()
            .map(|v| TrackedModelVersion {
                version: v.version,
                source: v.source.clone(),
                run_id: v.run_id.clone(),
                status: "READY".into(),
                tags: v.tags.clone().into_iter().collect(),
                creation_time_ms: v.creation_timestamp,
            })
            .collect(),
        last_updated_ms: m.last_updated_timestamp,
    }
}

#[allow(clippy::result_large_err)] // the RPC's own status
fn check_filter(filter: &str) -> Result<(), Status> {
    if filter.len() > MAX_FILTER {
        return Err(Status::invalid_argument(format!("filter: {} bytes; at most {MAX_FILTER}", filter.len())));
    }
    Ok(())
}

/// A request's namespace (MLflow workspace): `default` when empty.
fn ns_of(ns: &str) -> &str {
    if ns.is_empty() {
        crate::namespace::DEFAULT
    } else {
        ns
    }
}

impl TrackingGrpc {
    /// Narrows the guard's check to the request's namespace (its MLflow workspace).
    #[allow(clippy::result_large_err)] // the RPC's own status
    fn require<T>(&self, req: &Request<T>, cap: Capability, ns: &str, operation: &str, target: &str) -> Result<(), Status> {
        let authz = req.extensions().get::<Authz>();
        self.api.acl.require_ns(authz, cap, ns_of(ns), operation, target).map_err(|d| Status::permission_denied(d.to_string()))
    }

    /// A linearizable look at namespace `ns`'s tracking state.
    async fn read<T>(&self, ns: &str, f: impl FnOnce(&TrackingState) -> Result<T, TrackingError>) -> Result<T, Status> {
        super::http::read(&self.api, ns_of(ns), f).await.map_err(status)
    }
}

#[tonic::async_trait]
impl TrackingService for TrackingGrpc {
    async fn list_runs(&self, req: Request<ListRunsRequest>) -> Result<Response<ListRunsResponse>, Status> {
        self.require(&req, Capability::ReadJob, &req.get_ref().namespace.clone(), "tracking list runs", "")?;
        let req = req.into_inner();
        check_filter(&req.filter)?;
        let max = if req.max_results == 0 { 100 } else { req.max_results.min(MAX_LIST) } as usize;
        let clauses = parse_filter::<Run>(&req.filter).map_err(status)?;
        let order =
            parse_order_by::<Run>(&["attributes.start_time DESC".to_string(), "attributes.run_id ASC".to_string()]).map_err(status)?;
        let resp = self
            .read(&req.namespace, |s| {
                let exp_id = if req.experiment.is_empty() {
                    None
                } else if let Some(e) = s.experiment_by_name(&req.experiment) {
                    Some(e.experiment_id.clone())
                } else {
                    Some(s.experiment(&req.experiment)?.experiment_id.clone())
                };
                let mut found: Vec<&Run> = s
                    .runs
                    .values()
                    .filter(|r| r.lifecycle_stage == LIFECYCLE_ACTIVE)
                    .filter(|r| exp_id.as_ref().is_none_or(|id| *id == r.experiment_id))
                    .filter(|r| clauses.iter().all(|c| c.matches(*r)))
                    .collect();
                found.sort_by(|a, b| compare(*a, *b, &order));
                let matched = u32::try_from(found.len()).unwrap_or(u32::MAX);
                Ok(ListRunsResponse { runs: found.into_iter().take(max).map(|r| run_view(s, r)).collect(), matched })
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn get_run(&self, req: Request<GetRunRequest>) -> Result<Response<TrackedRun>, Status> {
        self.require(&req, Capability::ReadJob, &req.get_ref().namespace.clone(), "tracking get run", &req.get_ref().run_id.clone())?;
        let GetRunRequest { run_id: id, namespace } = req.into_inner();
        if id.is_empty() || id.len() > 256 {
            return Err(Status::invalid_argument("run_id: must be 1 to 256 bytes"));
        }
        let run = self.read(&namespace, |s| s.run(&id).map(|r| run_view(s, r))).await?;
        Ok(Response::new(run))
    }

    async fn list_models(&self, req: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        self.require(&req, Capability::ReadJob, &req.get_ref().namespace.clone(), "tracking list models", "")?;
        let ListModelsRequest { filter, namespace } = req.into_inner();
        check_filter(&filter)?;
        let clauses = parse_filter::<RegisteredModel>(&filter).map_err(status)?;
        let models = self
            .read(&namespace, |s| Ok(s.models.values().filter(|m| clauses.iter().all(|c| c.matches(*m))).map(model_view).collect()))
            .await?;
        Ok(Response::new(ListModelsResponse { models }))
    }

    async fn get_model(&self, req: Request<GetModelRequest>) -> Result<Response<TrackedModel>, Status> {
        self.require(&req, Capability::ReadJob, &req.get_ref().namespace.clone(), "tracking get model", &req.get_ref().name.clone())?;
        let GetModelRequest { name, namespace } = req.into_inner();
        let model = self.read(&namespace, |s| s.model(&name).map(model_view)).await?;
        Ok(Response::new(model))
    }

    async fn set_model_alias(&self, req: Request<SetModelAliasRequest>) -> Result<Response<TrackedModel>, Status> {
        self.require(&req, Capability::SubmitJob, &req.get_ref().namespace.clone(), "tracking set alias", &req.get_ref().name.clone())?;
        let SetModelAliasRequest { name, alias, version, namespace } = req.into_inner();
        if alias.is_empty() || alias.len() > 255 || alias.chars().any(char::is_control) {
            return Err(Status::invalid_argument("alias: must be 1 to 255 characters without control characters"));
        }
        super::check_alias_not_reserved(&alias).map_err(status)?;
        // Refused before Raft when the model or version is missing (apply checks it too).
        self.read(&namespace, |s| s.model_version(&name, version).map(|_| ())).await?;
        let cmd = TrackingCommand::SetAlias { name: name.clone(), alias, version };
        super::http::submit(&self.api, ns_of(&namespace), cmd).await.map_err(status)?;
        let model = self.read(&namespace, |s| s.model(&name).map(model_view)).await?;
        Ok(Response::new(model))
    }
}
