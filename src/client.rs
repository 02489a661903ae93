//! gRPC clients for the CLI, connected to a server given by `--address`.
//!
//! `--address` may list several servers (comma separated): the CLI connects to the first one
//! that answers. Any server accepts any request (followers forward to the leader), so which
//! one it reaches only matters for `--stale` reads.

use anyhow::Context;
use mlp_proto::v1::{
    alloc_service_client::AllocServiceClient, cluster_service_client::ClusterServiceClient,
    eval_service_client::EvalServiceClient, job_service_client::JobServiceClient,
    node_service_client::NodeServiceClient,
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
    pub cluster: ClusterServiceClient<Channel>,
}

pub fn endpoint_uri(address: &str) -> String {
    if address.starts_with("http://") || address.starts_with("https://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

/// Connects to the first server of the comma-separated `addresses` that accepts a connection.
pub async fn connect(addresses: &str) -> anyhow::Result<Clients> {
    let list: Vec<&str> = addresses.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
    if list.is_empty() {
        anyhow::bail!("--address is empty (set --address or MLP_ADDR)");
    }
    let mut last_err = None;
    for address in &list {
        match connect_one(address).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::debug!(%address, error = %e, "server unreachable; trying the next one");
                last_err = Some(e);
            }
        }
    }
    match last_err {
        Some(e) if list.len() == 1 => Err(e),
        Some(e) => Err(e.context(format!("none of the {} servers in --address answered", list.len()))),
        None => anyhow::bail!("no server address given"),
    }
}

async fn connect_one(address: &str) -> anyhow::Result<Clients> {
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
        evals: EvalServiceClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        cluster: ClusterServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES),
    })
}

/// Turns a gRPC status into an error that reads well on a terminal.
pub fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}
