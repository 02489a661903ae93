//! `ClientService` served by the agent on its rpc listener: `Logs` streams a task's stdout or
//! stderr from the rotated log files, optionally following it until the task is dead and the
//! allocation terminal; `Exec` runs a command inside a running task
//! ([`crate::rpc::exec_session`]).

pub mod exec_session;

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use mlp_proto::consts::{alloc_client, task_state};
use mlp_proto::v1::client_service_server::ClientService;
use mlp_proto::v1::{ExecRequest, ExecResponse, LogChunk, LogsRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::alloc::state::{AllocRegistry, AllocView};
use crate::task::logs::{log_base, LogReader, MAX_CHUNK};

/// How often a follower polls for new bytes.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// The agent's `ClientService`.
#[derive(Debug, Clone)]
pub struct ClientRpc {
    registry: AllocRegistry,
}

impl ClientRpc {
    /// Serves logs of the allocations in `registry`.
    pub fn new(registry: AllocRegistry) -> Self {
        ClientRpc { registry }
    }

    fn done(&self, alloc_id: &str, task: &str) -> bool {
        match self.registry.get(alloc_id) {
            None => true,
            Some(v) => {
                alloc_client::is_terminal(&v.client_status) && v.task_states.get(task).map(|s| s.state == task_state::DEAD).unwrap_or(true)
            }
        }
    }
}

type LogStream = Pin<Box<dyn Stream<Item = Result<LogChunk, Status>> + Send>>;
type ExecStream = Pin<Box<dyn Stream<Item = Result<ExecResponse, Status>> + Send>>;

/// Resolves an allocation id (or unique prefix) and a task name (empty: the group's only task)
/// on this node: (full id, the allocation's view, task name), or a status that says which
/// part is wrong.
#[allow(clippy::result_large_err)] // the RPC's own status, built once per failed call
pub fn resolve_task(registry: &AllocRegistry, alloc_id: &str, task: &str) -> Result<(String, AllocView, String), Status> {
    // Both end up in paths (the task's dir and log files): refused before any lookup.
    crate::paths::check_alloc_id(alloc_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if !task.is_empty() {
        crate::paths::check_task_name(task).map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    let id = match registry.resolve(alloc_id) {
        Ok(id) => id,
        Err(0) => return Err(Status::not_found(format!("allocation {alloc_id:?} not found on this node"))),
        Err(n) => return Err(Status::invalid_argument(format!("allocation prefix {alloc_id:?} matches {n} allocations"))),
    };
    let view = registry.get(&id).ok_or_else(|| Status::not_found(format!("allocation {id:?} not found")))?;
    let task = if task.is_empty() {
        match view.tasks.as_slice() {
            [one] => one.clone(),
            many => {
                return Err(Status::invalid_argument(format!("allocation {id} has {} tasks; name one of: {}", many.len(), many.join(", "))))
            }
        }
    } else if view.tasks.iter().any(|t| t == task) {
        task.to_string()
    } else {
        return Err(Status::invalid_argument(format!("task {task:?} not in allocation {id}; tasks: {}", view.tasks.join(", "))));
    };
    Ok((id, view, task))
}

#[tonic::async_trait]
impl ClientService for ClientRpc {
    type LogsStream = LogStream;
    type ExecStream = ExecStream;

    async fn exec(&self, request: Request<Streaming<ExecRequest>>) -> Result<Response<ExecStream>, Status> {
        let stream = crate::rpc::exec_session::serve(self.registry.clone(), request.into_inner()).await?;
        Ok(Response::new(stream))
    }

    async fn logs(&self, request: Request<LogsRequest>) -> Result<Response<LogStream>, Status> {
        let req = request.into_inner();
        let (id, view, task) = resolve_task(&self.registry, &req.alloc_id, &req.task)?;
        let dir = view.dir.join(&task).join("logs");
        let base = log_base(&task, req.stderr);
        let mut reader =
            LogReader::new(&dir, &base, req.offset, req.tail_bytes).map_err(|e| Status::internal(format!("reading logs: {e}")))?;
        let (tx, rx) = mpsc::channel::<Result<LogChunk, Status>>(8);
        let this = self.clone();
        let follow = req.follow;
        tokio::spawn(async move {
            let mut finishing = false;
            loop {
                match reader.read_chunk(MAX_CHUNK) {
                    Ok(Some((data, file))) => {
                        if tx.send(Ok(LogChunk { data, file })).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        if !follow || finishing {
                            return;
                        }
                        if this.done(&id, &task) {
                            // Drain what was written before the end, then stop.
                            finishing = true;
                            continue;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(FOLLOW_POLL) => {}
                            _ = tx.closed() => return,
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(format!("reading logs: {e}")))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids and task names that could name a path are refused before any lookup, with
    /// `InvalidArgument`, for both the Logs and the Exec RPC (both resolve through here).
    #[test]
    fn hostile_ids_and_task_names_are_invalid_arguments() {
        let registry = AllocRegistry::default();
        registry.put(
            "a1",
            AllocView { dir: std::path::PathBuf::from("/nonexistent/allocs/a1"), tasks: vec!["t".into()], ..Default::default() },
        );
        for v in crate::paths::tests::hostile() {
            let e = resolve_task(&registry, &v, "t").err();
            assert_eq!(e.map(|e| e.code()), Some(tonic::Code::InvalidArgument), "id {v:?}");
            if !v.is_empty() {
                let e = resolve_task(&registry, "a1", &v).err();
                assert_eq!(e.map(|e| e.code()), Some(tonic::Code::InvalidArgument), "task {v:?}");
            }
        }
        let ok = resolve_task(&registry, "a1", "").map(|(id, _, task)| (id, task));
        assert_eq!(ok.ok(), Some(("a1".to_string(), "t".to_string())));
    }
}
