//! Cluster operations for operators: `mlp server members` and `mlp operator raft …`
//! (high availability; the servers' side is `mlp_server::raft::cluster`).

use std::process::ExitCode;

use std::io::Write as _;
use std::path::Path;

use anyhow::Context;
use mlp_proto::v1::{ListPeersRequest, RaftPeer, RemovePeerRequest, SnapshotSaveRequest, TransferLeadershipRequest};
use serde::Serialize;

use crate::cli::{OperatorCommand, RaftCommand, ServerAction, SnapshotCommand};
use crate::client::{connect, status_err};
use crate::output::{print_json, Table};

/// One peer as `list-peers --json` prints it.
#[derive(Serialize)]
struct PeerJson {
    id: u64,
    address: String,
    voter: bool,
    leader: bool,
    /// Last log index the leader knows replicated to this server.
    matched_index: u64,
    /// The cluster's applied index as seen by the server that answered.
    applied_index: u64,
    /// Milliseconds since the leader last heard from a quorum (leader row only).
    last_contact_ms: Option<u64>,
}

async fn peers(addr: &str) -> anyhow::Result<(Vec<RaftPeer>, u64, u64)> {
    let mut c = connect(addr).await?;
    let resp = c.cluster.list_peers(ListPeersRequest {}).await.map_err(status_err)?.into_inner();
    Ok((resp.peers, resp.applied_index, resp.term))
}

fn print_peers(peers: Vec<RaftPeer>, applied: u64, json: bool) -> anyhow::Result<()> {
    if json {
        let rows: Vec<PeerJson> = peers
            .into_iter()
            .map(|p| PeerJson {
                id: p.id,
                address: p.address,
                voter: p.voter,
                leader: p.leader,
                matched_index: p.matched_index,
                applied_index: applied,
                last_contact_ms: p.last_contact_ms,
            })
            .collect();
        return print_json(&rows);
    }
    let mut t = Table::new(&["ID", "Address", "State", "Voter", "Matched index"]);
    for p in peers {
        let state = if p.leader {
            "leader"
        } else if p.voter {
            "follower"
        } else {
            "learner"
        };
        t.row(vec![p.id.to_string(), p.address, state.to_string(), p.voter.to_string(), p.matched_index.to_string()]);
    }
    print!("{}", t.render());
    Ok(())
}

pub async fn server_action(addr: &str, action: ServerAction) -> anyhow::Result<ExitCode> {
    match action {
        ServerAction::Members { json } => {
            let (p, applied, _) = peers(addr).await?;
            print_peers(p, applied, json)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub async fn operator(addr: &str, cmd: OperatorCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        OperatorCommand::Raft(RaftCommand::ListPeers { json }) => {
            let (p, applied, _) = peers(addr).await?;
            print_peers(p, applied, json)?;
        }
        OperatorCommand::Raft(RaftCommand::RemovePeer { id }) => {
            let mut c = connect(addr).await?;
            c.cluster.remove_peer(RemovePeerRequest { id }).await.map_err(status_err)?;
            println!("Server {id} removed from the cluster.");
        }
        OperatorCommand::Raft(RaftCommand::TransferLeadership { id }) => {
            let mut c = connect(addr).await?;
            let target_id = id.unwrap_or(0);
            let resp = c.cluster.transfer_leadership(TransferLeadershipRequest { target_id }).await.map_err(status_err)?.into_inner();
            if target_id != 0 && resp.leader_id != target_id {
                println!("Leadership moved to server {} (not the requested {target_id}: another voter won the election).", resp.leader_id);
                return Ok(ExitCode::from(1));
            }
            println!("Server {} is the leader now.", resp.leader_id);
        }
        OperatorCommand::Snapshot(SnapshotCommand::Save { file }) => {
            let mut c = crate::client::connect_patient(addr).await?;
            let mut stream = c.cluster.snapshot_save(SnapshotSaveRequest {}).await.map_err(status_err)?.into_inner();
            let (mut state, mut index) = (Vec::new(), 0);
            while let Some(chunk) = stream.message().await.map_err(status_err)? {
                index = chunk.index;
                state.extend_from_slice(&chunk.state);
            }
            let crc = write_snapshot(&file, index, &state)?;
            let points = match mlp_proto::snapshot::split(&state) {
                Ok((_, Some(_))) => " with every metric point",
                _ => " (without metric points: the server saves the older format)",
            };
            println!("Saved the cluster state at index {index}{points} to {} ({} bytes, crc32 {crc:08x}).", file.display(), state.len());
        }
        OperatorCommand::Snapshot(SnapshotCommand::Restore { file }) => {
            // Checked here first (clear error, nothing sent), and again by the server.
            let (header, state) = read_snapshot(&file)?;
            let mut c = crate::client::connect_patient(addr).await?;
            let resp = c
                .cluster
                .snapshot_restore(futures::stream::iter(mlp_proto::snapshot::restore_chunks(state, header.crc32)))
                .await
                .map_err(status_err)?
                .into_inner();
            println!(
                "Restored the cluster state saved at index {} and {} metric points from {} (committed at index {}).",
                header.index,
                resp.points,
                file.display(),
                resp.index
            );
        }
        OperatorCommand::Snapshot(SnapshotCommand::Inspect { file, json }) => {
            let (header, saved) = read_snapshot(&file)?;
            let (state, section) = mlp_proto::snapshot::split(&saved)?;
            let v: serde_json::Value = serde_json::from_slice(state).context("the snapshot's state is not valid JSON")?;
            // Every point decodes, or the file is refused (as a restore would refuse it).
            let metric_points = match section {
                Some(section) => Some(
                    mlp_server::tracking::points::decode_all(section)
                        .try_fold(0u64, |n, p| p.map(|_| n + 1))
                        .context("the snapshot's metric points do not decode")?,
                ),
                None => None,
            };
            let count = |k: &str| v.get(k).and_then(|m| m.as_object()).map(|m| m.len()).unwrap_or(0);
            let summary = SnapshotSummary {
                index: header.index,
                crc32: format!("{:08x}", header.crc32),
                bytes: saved.len(),
                metric_points,
                jobs: count("jobs"),
                nodes: count("nodes"),
                allocations: count("allocs"),
                evaluations: count("evals"),
            };
            if json {
                print_json(&summary)?;
            } else {
                println!("Snapshot {} is intact (crc32 {}).", file.display(), summary.crc32);
                println!(
                    "  index {}, {} bytes: {} jobs, {} nodes, {} allocations, {} evaluations",
                    summary.index, summary.bytes, summary.jobs, summary.nodes, summary.allocations, summary.evaluations
                );
                match summary.metric_points {
                    Some(n) => println!("  {n} metric points"),
                    None => println!("  no metric points (saved in the older format: a restore keeps the servers' points of its runs)"),
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The first line of a snapshot file; the saved snapshot's bytes (`mlp_proto::snapshot`) follow
/// it. `v2`: they carry metric points; files of `v1` (the state's JSON alone) are still read.
const SNAPSHOT_MAGIC: &str = "mlp-snapshot v2";
const SNAPSHOT_MAGIC_V1: &str = "mlp-snapshot v1";

#[derive(Serialize)]
struct SnapshotSummary {
    index: u64,
    crc32: String,
    bytes: usize,
    /// `None` for a file of the older format, which has none.
    metric_points: Option<u64>,
    jobs: usize,
    nodes: usize,
    allocations: usize,
    evaluations: usize,
}

struct SnapshotHeader {
    index: u64,
    crc32: u32,
}

/// Writes `mlp-snapshot v1 index=N len=L crc32=HEX\n` then the state, via a temp file and a
/// rename so a crash never leaves a truncated snapshot under the final name.
fn write_snapshot(file: &Path, index: u64, state: &[u8]) -> anyhow::Result<u32> {
    let crc = crc32fast::hash(state);
    let tmp = file.with_extension("partial");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let magic = if state.starts_with(mlp_proto::snapshot::MAGIC) { SNAPSHOT_MAGIC } else { SNAPSHOT_MAGIC_V1 };
    writeln!(f, "{magic} index={index} len={} crc32={crc:08x}", state.len())?;
    f.write_all(state)?;
    f.sync_all()?;
    std::fs::rename(&tmp, file).with_context(|| format!("cannot rename {} to {}", tmp.display(), file.display()))?;
    Ok(crc)
}

/// Reads a snapshot file and checks its length and checksum.
fn read_snapshot(file: &Path) -> anyhow::Result<(SnapshotHeader, Vec<u8>)> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let nl = bytes.iter().position(|b| *b == b'\n').context("not an mlp snapshot: no header line")?;
    let header = std::str::from_utf8(&bytes[..nl]).context("not an mlp snapshot: bad header")?;
    let rest = header
        .strip_prefix(SNAPSHOT_MAGIC)
        .or_else(|| header.strip_prefix(SNAPSHOT_MAGIC_V1))
        .with_context(|| format!("not an mlp snapshot (expected {SNAPSHOT_MAGIC:?} first)"))?;
    let field = |name: &str| {
        rest.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .with_context(|| format!("snapshot header lacks {name}"))
    };
    let index: u64 = field("index")?.parse().context("bad index in the snapshot header")?;
    let len: usize = field("len")?.parse().context("bad len in the snapshot header")?;
    let crc32 = u32::from_str_radix(field("crc32")?, 16).context("bad crc32 in the snapshot header")?;
    let state = bytes[nl + 1..].to_vec();
    if state.len() != len {
        anyhow::bail!("snapshot {} is truncated or padded: {} bytes of state, header says {len}", file.display(), state.len());
    }
    let actual = crc32fast::hash(&state);
    if actual != crc32 {
        anyhow::bail!("snapshot {} is corrupt: crc32 {actual:08x}, header says {crc32:08x}", file.display());
    }
    Ok((SnapshotHeader { index, crc32 }, state))
}
