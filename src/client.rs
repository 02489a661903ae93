//! gRPC clients for the CLI, connected to the server given by `--address`.

use anyhow::Context;
use mlp_proto::v1::{
    alloc_service_client::AllocServiceClient, eval_service_client::EvalServiceClient,
    job_service_client::JobServiceClient, node_service_client::NodeServiceClient,
};
use tonic::transport::{Channel, Endpoint};

/// Largest message the CLI accepts.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// One connection, one client per service.
pub struct Clients {
    pub jobs: JobServiceClient<Channel>,
    pub allocs: AllocServiceClient<Channel>,
    pub nodes: NodeServiceClient<Channel>,
    pub evals: EvalServiceClient<Channel>,
}

pub fn endpoint_uri(address: &str) -> String {
    if address.starts_with("http://") || address.starts_with("https://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

pub async fn connect(address: &str) -> anyhow::Result<Clients> {
    let uri = endpoint_uri(address);
    let channel = Endpoint::from_shared(uri.clone())
        .with_context(|| format!("invalid --address {address:?}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach the mlp server at {uri} (set --address or MLP_ADDR)"))?;
    Ok(Clients {
        jobs: JobServiceClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        allocs: AllocServiceClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        nodes: NodeServiceClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        evals: EvalServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES),
    })
}

/// Turns a gRPC status into an error that reads well on a terminal.
pub fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}
