//! Raft RPCs over gRPC: openraft's requests and replies travel as serde_json blobs inside
//! `RaftPayload.data` of the `RaftService` gRPC service.
//!
//! The client side ([`GrpcNetworkFactory`]) dials whatever address the target's
//! [`BasicNode`] carries, so adding members to the cluster needs nothing here. The reply blob
//! is the remote's whole `Result<Resp, RaftError>`, so remote Raft errors come back typed.

use std::sync::Arc;
use std::time::Duration;

use mlp_proto::v1::raft_service_client::RaftServiceClient;
use mlp_proto::v1::raft_service_server::{RaftService, RaftServiceServer};
use mlp_proto::v1::{BlobChunk, GetBlobRequest, PutBlobResponse, RaftPayload};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use super::{MlpRaft, NodeId, TypeConfig};

/// Raft messages can carry up to `max_payload_entries` entries or a whole snapshot; allow
/// large gRPC messages in both directions.
const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// A transport-level failure, before any remote reply was decoded.
#[derive(Debug, thiserror::Error)]
enum TransportError {
    #[error("invalid raft peer address {addr:?}: {source}")]
    Address { addr: String, source: tonic::transport::Error },
    #[error("raft rpc to {addr} failed: {status}")]
    Status { addr: String, status: Box<tonic::Status> },
    #[error("encoding or decoding a raft message: {0}")]
    Codec(#[from] serde_json::Error),
}

/// How long replication to an unreachable peer pauses before retrying when nothing else is
/// configured (openraft's own default).
const DEFAULT_BACKOFF: Duration = Duration::from_millis(500);

/// Creates [`GrpcNetwork`] clients, one per target node.
#[derive(Debug, Clone)]
pub struct GrpcNetworkFactory {
    backoff: Duration,
    /// Mutual TLS to the peers (which must hold the server role), when configured.
    tls: Option<Arc<mlp_tls::Tls>>,
}

impl Default for GrpcNetworkFactory {
    fn default() -> Self {
        GrpcNetworkFactory { backoff: DEFAULT_BACKOFF, tls: None }
    }
}

impl GrpcNetworkFactory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Retries an unreachable peer every `backoff`. Keep it below the election timeout: a
    /// restarted server that hears nothing from the leader for longer calls an election,
    /// which (once the leader lease has passed) deposes a healthy leader.
    pub fn with_backoff(backoff: Duration) -> Self {
        GrpcNetworkFactory { backoff, tls: None }
    }

    /// Dials peers over mutual TLS with this identity (`None`: plaintext).
    pub fn with_tls(mut self, tls: Option<Arc<mlp_tls::Tls>>) -> Self {
        self.tls = tls;
        self
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetworkFactory {
    type Network = GrpcNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        GrpcNetwork { target, target_node: node.clone(), client: None, backoff: self.backoff, tls: self.tls.clone() }
    }
}

/// The connection to one peer. The channel is created lazily (and recreated after an invalid
/// address) so that a peer that is down at start-up doesn't block anything.
pub struct GrpcNetwork {
    target: NodeId,
    target_node: BasicNode,
    client: Option<RaftServiceClient<Channel>>,
    backoff: Duration,
    tls: Option<Arc<mlp_tls::Tls>>,
}

impl GrpcNetwork {
    fn client(&mut self) -> Result<RaftServiceClient<Channel>, TransportError> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let addr = self.target_node.addr.clone();
        let endpoint = Endpoint::from_shared(mlp_tls::net::uri_for(&addr, self.tls.is_some()))
            .map_err(|source| TransportError::Address { addr: addr.clone(), source })?;
        let channel = mlp_tls::net::channel_lazy(endpoint, self.tls.as_ref(), mlp_tls::Role::Server);
        let client =
            RaftServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES);
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Sends one RPC: `call` picks the gRPC method; the reply decodes to the remote's result.
    async fn send<Req, Resp, E, F, Fut>(&mut self, req: &Req, option: &RPCOption, call: F) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        F: FnOnce(RaftServiceClient<Channel>, tonic::Request<RaftPayload>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<RaftPayload>, tonic::Status>>,
    {
        let data = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let client = self.client().map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { data });
        request.set_timeout(option.hard_ttl());
        let addr = self.target_node.addr.clone();
        let reply = match call(client, request).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let code = status.code();
                let err = TransportError::Status { addr, status: Box::new(status) };
                tracing::debug!(target_node = self.target, error = %err, "raft rpc failed");
                // Connection-level failures mean "back off"; anything else is worth a retry.
                return Err(match code {
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                        RPCError::Unreachable(Unreachable::new(&err))
                    }
                    _ => RPCError::Network(NetworkError::new(&err)),
                });
            }
        };
        let result: Result<Resp, E> =
            serde_json::from_slice(&reply.data).map_err(|e| RPCError::Network(NetworkError::new(&TransportError::Codec(e))))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new_with_node(self.target, self.target_node.clone(), e)))
    }
}

impl RaftNetwork<TypeConfig> for GrpcNetwork {
    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(self.backoff))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(&rpc, &option, |mut c, r| async move { c.append_entries(r).await }).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>> {
        self.send(&rpc, &option, |mut c, r| async move { c.install_snapshot(r).await }).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(&rpc, &option, |mut c, r| async move { c.vote(r).await }).await
    }
}

/// The server side: hands incoming Raft RPCs to the local Raft, and the artifact blob RPCs
/// (`PutBlob`, `GetBlob`) to the artifact store when there is one.
#[derive(Clone)]
pub struct RaftGrpcService {
    raft: MlpRaft,
    artifacts: Option<Arc<crate::tracking::artifacts::ArtifactService>>,
}

impl RaftGrpcService {
    pub fn new(raft: MlpRaft) -> Self {
        RaftGrpcService { raft, artifacts: None }
    }
}

/// The gRPC service to mount on the server's listener (next to the public API).
pub fn raft_grpc_service(raft: MlpRaft) -> RaftServiceServer<RaftGrpcService> {
    raft_grpc_service_with_artifacts(raft, None)
}

/// [`raft_grpc_service`] that also serves this server's artifact blobs to its peers.
pub fn raft_grpc_service_with_artifacts(
    raft: MlpRaft,
    artifacts: Option<Arc<crate::tracking::artifacts::ArtifactService>>,
) -> RaftServiceServer<RaftGrpcService> {
    RaftServiceServer::new(RaftGrpcService { raft, artifacts })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

// `tonic::Status` is what the generated service trait returns; boxing it here buys nothing.
#[allow(clippy::result_large_err)]
fn decode<T: DeserializeOwned>(request: tonic::Request<RaftPayload>) -> Result<T, tonic::Status> {
    serde_json::from_slice(&request.into_inner().data).map_err(|e| tonic::Status::invalid_argument(format!("decoding raft request: {e}")))
}

#[allow(clippy::result_large_err)]
fn encode<T: Serialize>(result: &T) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
    let data = serde_json::to_vec(result).map_err(|e| tonic::Status::internal(format!("encoding raft reply: {e}")))?;
    Ok(tonic::Response::new(RaftPayload { data }))
}

#[tonic::async_trait]
impl RaftService for RaftGrpcService {
    type GetBlobStream = futures::stream::BoxStream<'static, Result<BlobChunk, tonic::Status>>;

    async fn put_blob(
        &self,
        request: tonic::Request<tonic::Streaming<BlobChunk>>,
    ) -> Result<tonic::Response<PutBlobResponse>, tonic::Status> {
        let store = self.artifacts.as_ref().ok_or_else(|| tonic::Status::unimplemented("no artifact store"))?;
        store.receive_push(request.into_inner()).await.map(tonic::Response::new)
    }

    async fn get_blob(&self, request: tonic::Request<GetBlobRequest>) -> Result<tonic::Response<Self::GetBlobStream>, tonic::Status> {
        let store = self.artifacts.as_ref().ok_or_else(|| tonic::Status::unimplemented("no artifact store"))?;
        store.serve_blob(request.into_inner()).await.map(tonic::Response::new)
    }

    async fn append_entries(&self, request: tonic::Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let req: AppendEntriesRequest<TypeConfig> = decode(request)?;
        encode(&self.raft.append_entries(req).await)
    }

    async fn vote(&self, request: tonic::Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let req: VoteRequest<NodeId> = decode(request)?;
        encode(&self.raft.vote(req).await)
    }

    async fn install_snapshot(&self, request: tonic::Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let req: InstallSnapshotRequest<TypeConfig> = decode(request)?;
        encode(&self.raft.install_snapshot(req).await)
    }
}
