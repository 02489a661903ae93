//! High availability across real network namespaces: cluster formation, forwarding, operator
//! commands, leader kill -9 under a stream of writes, and a partitioned leader.
//!
//! Each test builds its own hosts with the `multihost` harness (servers on hosts 0..n, the CLI
//! as a client on the last host). A machine without root, iproute2 or network namespaces fails
//! them with what is missing (`MLP_TEST_ALLOW_SKIP=1` skips instead; see `tests/prereq`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod linearizability;
mod multihost;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use linearizability::{Checker, Kind, Outcome, Recorder, Verdict};
use multihost::{alive, assert_all_once, list_peers, wait_for, wait_leader, Client, Net, Writer, GRPC_PORT};

/// How many times the leader is killed in a row.
const KILL_ROUNDS: usize = 10;
/// Concurrent clients writing and reading registers while the leader is killed.
const REGISTER_CLIENTS: usize = 8;
/// A new leader must acknowledge a write within this after the old one is killed.
const FAILOVER_BOUND: Duration = Duration::from_secs(15);
/// Forming a cluster from scratch.
const FORM_BOUND: Duration = Duration::from_secs(30);

macro_rules! require_netns {
    ($($need:expr),*) => {
        if !multihost::require_netns(&[$($need),*]) {
            return;
        }
    };
}

/// `n` servers and one client host; returns the net, the server process indexes, their
/// addresses and the client host index.
fn cluster(n: usize) -> (Net, Vec<usize>, Vec<String>, usize) {
    cluster_with(n, &multihost::RAFT_FLAGS)
}

fn cluster_with(n: usize, raft_flags: &[&str]) -> (Net, Vec<usize>, Vec<String>, usize) {
    let mut net = Net::new();
    for i in 0..n {
        net.add_host(&format!("server{i}"));
    }
    let client = net.add_host("client");
    let procs = multihost::start_servers_with(&mut net, n, raft_flags);
    let addrs: Vec<String> = (0..n).map(|i| format!("{}:{GRPC_PORT}", net.hosts[i].ip)).collect();
    (net, procs, addrs, client)
}

fn server_index(addrs: &[String], addr: &str) -> usize {
    addrs.iter().position(|a| a == addr).unwrap_or_else(|| panic!("unknown server address {addr}"))
}

#[test]
fn ha_cluster_forms_forwards_and_changes_membership() {
    require_netns!();
    let (mut net, procs, addrs, client) = cluster(3);
    let leader = wait_leader(&net, client, &addrs, 3, FORM_BOUND);
    let c = net.client(client);

    // Members: three voters, one leader, ids distinct.
    let peers = list_peers(&net, client, &addrs[0]).expect("list-peers");
    assert_eq!(peers.len(), 3, "{peers:?}");
    assert_eq!(peers.iter().filter(|p| p.leader).count(), 1, "{peers:?}");
    let out = net.mlp(client, &["server", "members", "--address", &addrs[1]], Duration::from_secs(10)).expect("members");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).matches("198.18.").count(), 3);

    // Writes through a follower are forwarded; linearizable reads on another follower see them.
    let followers: Vec<&String> = addrs.iter().filter(|a| **a != leader).collect();
    assert!(c.register(followers[0], "via-follower", Duration::from_secs(20)), "write through a follower");
    let ids = c.job_ids(followers[1], false).expect("read on the other follower");
    assert!(ids.contains(&"via-follower".to_string()), "linearizable read missed an acknowledged write: {ids:?}");

    // Snapshot save through a follower holds the acknowledged write; a flipped byte is caught.
    let snap = net.path("state.snap");
    let out = net
        .mlp(client, &["operator", "snapshot", "save", &snap.display().to_string(), "--address", followers[0]], Duration::from_secs(20))
        .expect("snapshot save finishes");
    assert!(out.status.success(), "snapshot save: {}", String::from_utf8_lossy(&out.stderr));
    let out =
        net.mlp(client, &["operator", "snapshot", "inspect", "--json", &snap.display().to_string()], Duration::from_secs(10)).unwrap();
    assert!(out.status.success(), "snapshot inspect: {}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["jobs"], 1, "{summary}");
    let mut bytes = std::fs::read(&snap).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x20;
    std::fs::write(&snap, bytes).unwrap();
    let out = net.mlp(client, &["operator", "snapshot", "inspect", &snap.display().to_string()], Duration::from_secs(10)).unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("corrupt"), "a corrupt snapshot must be refused");

    // Transfer leadership to a chosen follower.
    let target = peers.iter().find(|p| !p.leader).expect("a follower").clone();
    let out = net
        .mlp(client, &["operator", "raft", "transfer-leadership", &target.id.to_string(), "--address", &addrs[0]], Duration::from_secs(30))
        .expect("transfer-leadership finishes");
    let new_leader = wait_leader(&net, client, &addrs, 3, FORM_BOUND);
    assert_ne!(new_leader, leader, "leadership did not move: {}", String::from_utf8_lossy(&out.stdout));

    // Remove a follower, then add a fresh server that joins the running cluster.
    let victim = wait_for("a follower to remove", FORM_BOUND, || list_peers(&net, client, &new_leader)?.into_iter().find(|p| !p.leader));
    let out = net
        .mlp(client, &["operator", "raft", "remove-peer", &victim.id.to_string(), "--address", &new_leader], Duration::from_secs(30))
        .expect("remove-peer finishes");
    assert!(out.status.success(), "remove-peer: {}", String::from_utf8_lossy(&out.stderr));
    net.procs[procs[server_index(&addrs, &victim.address)]].kill9();
    wait_for("two voters", FORM_BOUND, || {
        let p = list_peers(&net, client, &new_leader)?;
        (p.len() == 2 && p.iter().all(|p| p.voter)).then_some(())
    });
    assert!(c.register(&new_leader, "after-remove", Duration::from_secs(20)), "two voters still commit");

    let extra = net.add_host("server-extra");
    let extra_addr = format!("{}:{GRPC_PORT}", net.hosts[extra].ip);
    let mut args: Vec<String> = vec![
        "server".into(),
        "--data-dir".into(),
        net.path("server-extra").display().to_string(),
        "--grpc-addr".into(),
        extra_addr.clone(),
        "--http-addr".into(),
        format!("{}:0", net.hosts[extra].ip),
        "--join".into(),
        new_leader.clone(),
    ];
    args.extend(multihost::RAFT_FLAGS.iter().map(|s| s.to_string()));
    net.spawn("server-extra", extra, &args);
    wait_for("the new server to become a voter", FORM_BOUND, || {
        let p = list_peers(&net, client, &new_leader)?;
        p.iter().any(|p| p.address == extra_addr && p.voter).then_some(())
    });
    // The newcomer caught up: its own (stale) state has every job.
    wait_for("the new server to catch up", FORM_BOUND, || {
        let ids = c.job_ids(&extra_addr, true)?;
        (ids.contains(&"via-follower".to_string()) && ids.contains(&"after-remove".to_string())).then_some(())
    });
}

// ---- registers: a job's `meta.v`, written by `mlp job run`, read by `mlp job status` ----

/// The spec of register `key` holding `value`: a service job with no instances (nothing to
/// schedule), so a write is one Raft entry (plus its evaluation) and a read is one job lookup.
fn register_spec(key: &str, value: u64) -> String {
    format!(
        "job \"{key}\" {{\n  type = \"service\"\n  meta {{\n    v = \"{value}\"\n  }}\n  group \"g\" {{\n    count = 0\n    task \"t\" {{\n      driver = \"raw_exec\"\n      config {{\n        command = \"/bin/true\"\n      }}\n      resources {{\n        cpu = 10\n        memory = 8\n      }}\n    }}\n  }}\n}}\n"
    )
}

/// `mlp job run --detach` of `key = value` through `addresses`, recorded: acknowledged, or
/// unknown (a failed or timed-out CLI may still have committed).
fn write_register(c: &Client, rec: &Recorder, who: usize, addresses: &str, key: &str, value: u64) -> bool {
    let file = c.dir.join(format!("reg-{who}-{value}.hcl"));
    std::fs::write(&file, register_spec(key, value)).expect("register spec");
    let call = rec.now();
    let out = c.mlp(&["job", "run", "--detach", "--address", addresses, &file.display().to_string()], Duration::from_secs(20));
    let ok = out.is_some_and(|o| o.status.success());
    rec.record(who, key, Kind::Write(value), call, if ok { Outcome::Ok } else { Outcome::Unknown });
    let _ = std::fs::remove_file(&file);
    ok
}

/// The value of `key` in `mlp job status --json` output.
fn register_value(stdout: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(stdout).ok()?;
    v.pointer("/job/meta/v")?.as_str()?.parse().ok()
}

/// `mlp job status KEY --json` through `addresses` (linearizable unless `stale`), recorded
/// unless stale; `None` when the read failed.
fn read_register(c: &Client, rec: &Recorder, who: usize, addresses: &str, key: &str, stale: bool) -> Option<Option<u64>> {
    let mut args = vec!["job", "status", key, "--json", "--address", addresses];
    if stale {
        args.push("--stale");
    }
    let call = rec.now();
    let out = c.mlp(&args, Duration::from_secs(20))?;
    let value = if out.status.success() {
        Some(
            register_value(&out.stdout)
                .unwrap_or_else(|| panic!("job status of {key} without meta.v: {}", String::from_utf8_lossy(&out.stdout))),
        )
    } else if String::from_utf8_lossy(&out.stderr).contains("not found") {
        None
    } else {
        return None;
    };
    if !stale {
        rec.record(who, key, Kind::Read(value), call, Outcome::Ok);
    }
    Some(value)
}

/// Client threads, each writing its own key's register (clients share keys in pairs) and
/// reading a key after every write, until stopped; every operation is recorded.
struct RegisterClients {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl RegisterClients {
    /// `addresses[i]` are client `first + i`'s servers; it writes `keys[i % keys.len()]`.
    fn start(c: &Client, rec: &Recorder, first: usize, addresses: &[String], keys: &[String]) -> RegisterClients {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let handles = addresses
            .iter()
            .enumerate()
            .map(|(i, addrs)| {
                let (c, rec, stop, acked, addrs, keys) =
                    (c.clone(), rec.clone(), stop.clone(), acked.clone(), addrs.clone(), keys.to_vec());
                let who = first + i;
                std::thread::spawn(move || {
                    // Bounded: stopped by the test; every CLI call has a timeout.
                    for seq in 1..100_000u64 {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        // Unique values: client in the high digits, sequence number below.
                        if write_register(&c, &rec, who, &addrs, &keys[i % keys.len()], (who as u64 + 1) * 1_000_000 + seq) {
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        read_register(&c, &rec, who, &addrs, &keys[(i + seq as usize) % keys.len()], false);
                    }
                })
            })
            .collect();
        RegisterClients { stop, acked, handles }
    }

    fn acked(&self) -> usize {
        self.acked.load(Ordering::SeqCst)
    }

    fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for RegisterClients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// `n` orderings of `addrs` (rotated), so that clients do not all try the same server first.
fn rotations(addrs: &[String], n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let mut a = addrs.to_vec();
            a.rotate_left(i % addrs.len());
            a.join(",")
        })
        .collect()
}

/// Whether an acknowledged write started after `t` (on the recorder's clock).
fn acked_write_after(rec: &Recorder, t: u64) -> bool {
    rec.history().iter().any(|o| matches!(o.kind, Kind::Write(_)) && o.outcome == Outcome::Ok && o.call > t)
}

/// Final linearizable reads of every key (recorded), then the check of the whole history,
/// then: every server converges on the final values, and every acknowledged write is among
/// its job's versions (where no version was trimmed).
fn check_registers(net: &Net, client: usize, rec: &Recorder, addrs: &[String], keys: &[String]) {
    let c = net.client(client);
    let all = addrs.join(",");
    let mut finals = Vec::new();
    for key in keys {
        let v = wait_for("a final read", FORM_BOUND, || read_register(&c, rec, 999, &all, key, false));
        finals.push(v);
    }
    let history = rec.history();
    let (writes, reads) = history.iter().fold((0, 0), |(w, r), o| match o.kind {
        Kind::Write(_) => (w + 1, r),
        Kind::Read(_) => (w, r + 1),
    });
    let started = Instant::now();
    let verdict = Checker::default().check(&history);
    eprintln!("linearizability: {writes} writes, {reads} reads over {} keys checked in {:?}: {verdict:?}", keys.len(), started.elapsed());
    if let Verdict::NotLinearizable { key, history } = &verdict {
        panic!("the history of {key} is not linearizable:\n{}", linearizability::describe(history, 400));
    }
    assert_eq!(verdict, Verdict::Linearizable);
    for (key, v) in keys.iter().zip(&finals) {
        for a in addrs {
            wait_for("every server to converge on the final value", FORM_BOUND, || {
                (read_register(&c, rec, 999, a, key, true)? == *v).then_some(())
            });
        }
        let out = c.mlp(&["job", "history", key, "--json", "--address", &all], Duration::from_secs(20)).expect("job history answers");
        assert!(out.status.success(), "job history {key}: {}", String::from_utf8_lossy(&out.stderr));
        let versions: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("versions JSON");
        let seen: Vec<u64> = versions.iter().filter_map(|j| j.pointer("/meta/v")?.as_str()?.parse().ok()).collect();
        if versions.len() < 100 {
            let lost: Vec<u64> = history
                .iter()
                .filter(|o| o.key == *key && o.outcome == Outcome::Ok)
                .filter_map(|o| match o.kind {
                    Kind::Write(v) => (!seen.contains(&v)).then_some(v),
                    Kind::Read(_) => None,
                })
                .collect();
            assert!(lost.is_empty(), "acknowledged writes of {key} missing from its versions: {lost:?}");
        }
    }
}

/// The id of the server at `addr`, as the cluster names it.
fn server_id(net: &Net, client: usize, addr: &str) -> u64 {
    wait_for("the server's id", FORM_BOUND, || list_peers(net, client, addr)?.into_iter().find(|p| p.address == addr)).id
}

/// A leader other than `old_id`, as one of `survivors` reports it.
fn new_leader_among(net: &Net, client: usize, survivors: &[String], old_id: u64, bound: Duration) -> multihost::Peer {
    wait_for("a different server to lead", bound, || {
        survivors.iter().find_map(|a| list_peers(net, client, a)?.into_iter().find(|p| p.leader && p.id != old_id))
    })
}

/// Kill -9 the leader in rounds under 8 concurrent clients writing and reading per-key
/// registers through all servers; every round a different server must take over and
/// acknowledge a write; the recorded history must be linearizable.
#[test]
fn ha_leader_kill9_repeatedly_stays_linearizable() {
    require_netns!();
    let (mut net, procs, addrs, client) = cluster(3);
    let mut leader = wait_leader(&net, client, &addrs, 3, FORM_BOUND);
    let c = net.client(client);
    let all = addrs.join(",");
    let rec = Recorder::new();
    let keys: Vec<String> = (0..REGISTER_CLIENTS / 2).map(|k| format!("reg-{k}")).collect();
    for key in &keys {
        assert!(write_register(&c, &rec, 900, &all, key, 0), "initial write of {key}");
    }
    let clients = RegisterClients::start(&c, &rec, 0, &rotations(&addrs, REGISTER_CLIENTS), &keys);
    for round in 0..KILL_ROUNDS {
        let before = clients.acked();
        wait_for("writes before the kill", Duration::from_secs(60), || (clients.acked() >= before + REGISTER_CLIENTS).then_some(()));
        let old_id = server_id(&net, client, &leader);
        let idx = procs[server_index(&addrs, &leader)];
        let (killed_at, killed) = (rec.now(), Instant::now());
        net.procs[idx].kill9();
        let survivors: Vec<String> = addrs.iter().filter(|a| **a != leader).cloned().collect();
        let new = new_leader_among(&net, client, &survivors, old_id, FAILOVER_BOUND);
        wait_for("an acknowledged write after the kill", FAILOVER_BOUND, || acked_write_after(&rec, killed_at).then_some(()));
        eprintln!(
            "round {round}: killed leader {leader} (id {old_id}); {} (id {}) leads; a write acknowledged after {:?}",
            new.address,
            new.id,
            killed.elapsed()
        );
        // Bring the killed server back on its data dir: it rejoins without bootstrapping.
        net.restart(idx);
        leader = wait_leader(&net, client, &addrs, 3, FORM_BOUND);
    }
    clients.finish();
    check_registers(&net, client, &rec, &addrs, &keys);
}

/// SIGSTOP the leader for longer than the election timeout: the others elect a new leader and
/// keep acknowledging writes; after SIGCONT the old leader steps down. Clients that only talk
/// to the old leader get answers only for writes the new leader committed. The history
/// (including those clients) is linearizable and no acknowledged write is missing.
#[test]
fn ha_paused_leader_acknowledges_nothing_it_did_not_commit() {
    require_netns!();
    let (net, procs, addrs, client) = cluster(3);
    let leader = wait_leader(&net, client, &addrs, 3, FORM_BOUND);
    let li = server_index(&addrs, &leader);
    let old_id = server_id(&net, client, &leader);
    let c = net.client(client);
    let all = addrs.join(",");
    let rec = Recorder::new();
    let keys: Vec<String> = (0..3).map(|k| format!("reg-{k}")).collect();
    for key in &keys {
        assert!(write_register(&c, &rec, 900, &all, key, 0), "initial write of {key}");
    }
    // Four clients through all servers, two through the old leader alone (sharing a key with
    // the others, so their writes interleave).
    let mut per_client = rotations(&addrs, 4);
    per_client.extend([leader.clone(), leader.clone()]);
    let clients = RegisterClients::start(&c, &rec, 0, &per_client, &keys);
    wait_for("writes before the pause", Duration::from_secs(60), || (clients.acked() >= 6).then_some(()));

    net.procs[procs[li]].signal(nix::sys::signal::Signal::SIGSTOP);
    let paused = Instant::now();
    let survivors: Vec<String> = addrs.iter().filter(|a| **a != leader).cloned().collect();
    let new = new_leader_among(&net, client, &survivors, old_id, FAILOVER_BOUND);
    let elected_at = rec.now();
    let before = clients.acked();
    wait_for("writes acknowledged by the new leader", Duration::from_secs(60), || {
        (clients.acked() >= before + 12 && acked_write_after(&rec, elected_at)).then_some(())
    });
    eprintln!("paused {leader} (id {old_id}); {} (id {}) leads after {:?}", new.address, new.id, paused.elapsed());
    net.procs[procs[li]].signal(nix::sys::signal::Signal::SIGCONT);
    let resumed_at = rec.now();

    let healed = wait_leader(&net, client, &addrs, 3, FORM_BOUND);
    eprintln!("after SIGCONT all servers agree on leader {healed}");
    // The clients bound to the old leader get answers again (forwarded to the new leader).
    wait_for("a write through the old leader acknowledged after it resumed", Duration::from_secs(60), || {
        rec.history()
            .iter()
            .any(|o| o.client >= 4 && matches!(o.kind, Kind::Write(_)) && o.outcome == Outcome::Ok && o.call > resumed_at)
            .then_some(())
    });
    clients.finish();
    check_registers(&net, client, &rec, &addrs, &keys);
}

#[test]
fn ha_partitioned_leader_stops_acknowledging_and_heals() {
    require_netns!();
    let (net, _procs, addrs, client) = cluster(3);
    let old_leader = wait_leader(&net, client, &addrs, 3, FORM_BOUND);
    let c = net.client(client);
    assert!(c.register(&old_leader, "before-partition", Duration::from_secs(20)));
    let li = server_index(&addrs, &old_leader);
    net.link(li, false);

    // The majority elects a new leader and serves writes.
    let majority: Vec<String> = addrs.iter().filter(|a| **a != old_leader).cloned().collect();
    let new_leader = wait_for("a new leader in the majority", FORM_BOUND, || {
        majority.iter().find_map(|a| list_peers(&net, client, a)?.into_iter().find(|p| p.leader && p.address != old_leader))
    });
    assert!(c.register(&majority.join(","), "during-partition", Duration::from_secs(20)), "majority serves writes");

    // The old leader cannot be reached from the client either (its link is down), so ask it
    // from its own host: it must not acknowledge a write.
    let own = net.client(li);
    assert!(!own.register(&old_leader, "on-old-leader", Duration::from_secs(8)), "isolated old leader acknowledged a write");

    net.link(li, true);
    let healed = wait_leader(&net, client, &addrs, 3, FORM_BOUND);
    assert_ne!(healed, "", "a leader after healing");
    eprintln!("partition: old leader {old_leader}, new leader {}, after heal {healed}", new_leader.address);
    // One history: every server has the acknowledged writes, and the same job set.
    let mut sets = Vec::new();
    for a in &addrs {
        let ids = wait_for("the healed server to converge", FORM_BOUND, || {
            let mut ids = c.job_ids(a, true)?;
            ids.sort();
            (ids.contains(&"before-partition".to_string()) && ids.contains(&"during-partition".to_string())).then_some(ids)
        });
        sets.push(ids);
    }
    // "on-old-leader" was never acknowledged; it may or may not have committed later, but
    // all servers must agree.
    wait_for("identical job sets", FORM_BOUND, || {
        let all: Vec<Vec<String>> = addrs
            .iter()
            .filter_map(|a| {
                let mut ids = c.job_ids(a, true)?;
                ids.sort();
                Some(ids)
            })
            .collect();
        (all.len() == addrs.len() && all.windows(2).all(|w| w[0] == w[1])).then_some(())
    });
}

#[test]
fn ha_node_loss_replaces_allocations_and_stops_stale_copies() {
    require_netns!();
    const TTL_SECS: &str = "2";
    let mut net = Net::new();
    let server = net.add_host("server");
    let agents = [net.add_host("agent-a"), net.add_host("agent-b")];
    let client = net.add_host("client");
    let addr = multihost::start_single_server(&mut net, server, TTL_SECS);
    for (i, h) in agents.iter().enumerate() {
        multihost::start_agent(&mut net, *h, &addr, i);
    }
    let c = net.client(client);
    multihost::wait_ready_nodes(&c, &addr, 2, FORM_BOUND);
    let spec = net.path("svc.hcl");
    std::fs::write(&spec, multihost::SLEEP_SERVICE_JOB).unwrap();
    let out = c.mlp(&["job", "run", "--detach", "--address", &addr, &spec.display().to_string()], Duration::from_secs(20)).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (first_id, first_node, _, _, first_pid) =
        wait_for("the allocation running", FORM_BOUND, || c.allocs(&addr, "svc")?.into_iter().find(|a| a.2 == "running" && a.4 != 0));
    // Which agent host runs it: ask the nodes list for the node's name.
    let name = multihost::nodes(&c, &addr).unwrap().into_iter().find(|n| n.0 == first_node).unwrap().1;
    let lost_host = if name == "agent-0" { agents[0] } else { agents[1] };

    net.link(lost_host, false);
    let cut_at = Instant::now();
    let replacement = wait_for("a replacement running on the other node", Duration::from_secs(30), || {
        let list = c.allocs(&addr, "svc")?;
        let old_lost = list.iter().any(|a| a.0 == first_id && a.2 == "lost");
        let new = list.into_iter().find(|a| a.0 != first_id && a.1 != first_node && a.2 == "running")?;
        old_lost.then_some(new)
    });
    let took = cut_at.elapsed();
    eprintln!("node loss: replacement running after {took:?} (TTL {TTL_SECS}s)");
    assert!(took < Duration::from_secs(2 + 10), "replacement took {took:?}");
    // The cut-off agent still runs its copy; reconnecting it must stop that copy.
    assert!(alive(first_pid), "the stale copy ended before the agent reconnected");
    net.link(lost_host, true);
    wait_for("the stale copy stopped after reconnecting", Duration::from_secs(30), || (!alive(first_pid)).then_some(()));
    let list = c.allocs(&addr, "svc").unwrap();
    assert_eq!(list.iter().filter(|a| a.2 == "running").count(), 1, "exactly one copy runs: {list:?}");
    assert!(list.iter().any(|a| a.0 == replacement.0 && a.2 == "running"));
}

/// 30% of the packets arriving at the leader's host are dropped (nftables `numgen random`
/// inside its namespace) while a client keeps registering: writes keep being acknowledged
/// (through this leader or a successor), none is lost or duplicated, and once the loss ends
/// every server converges on the same jobs.
#[test]
fn ha_packet_loss_at_the_leader_loses_no_acknowledged_write() {
    require_netns!(multihost::prereq::Need::Nft);
    let (net, _procs, addrs, client) = cluster(3);
    let leader = wait_leader(&net, client, &addrs, 3, FORM_BOUND);
    let c = net.client(client);
    let writer = Writer::start(c.clone(), addrs.join(","), "l");
    wait_for("writes before the loss", Duration::from_secs(30), || (writer.count() >= 3).then_some(()));
    let li = server_index(&addrs, &leader);
    net.packet_loss(li, 30);
    let before = writer.count();
    wait_for("acknowledged writes under 30% loss", Duration::from_secs(60), || (writer.count() >= before + 10).then_some(()));
    net.packet_loss(li, 0);
    let after = writer.count();
    wait_for("writes after the loss", Duration::from_secs(30), || (writer.count() >= after + 3).then_some(()));
    let acked = writer.finish();
    let leader = wait_leader(&net, client, &addrs, 3, FORM_BOUND);
    let ids = wait_for("the final read", Duration::from_secs(20), || c.job_ids(&leader, false));
    assert_all_once(&acked, &ids);
    for a in &addrs {
        wait_for("every server to have every acknowledged job", FORM_BOUND, || {
            let ids = c.job_ids(a, true)?;
            acked.iter().all(|n| ids.contains(n)).then_some(())
        });
    }
}

/// A follower that was down while the leader compacted its log past the follower's position
/// catches up from a snapshot (there are no log entries left to send it), over the network.
#[test]
fn ha_lagging_follower_catches_up_from_a_snapshot() {
    require_netns!();
    let mut flags: Vec<&str> = multihost::RAFT_FLAGS.to_vec();
    flags.extend(["--raft-snapshot-logs", "8", "--raft-keep-logs", "2"]);
    let (mut net, procs, addrs, client) = cluster_with(3, &flags);
    let leader = wait_leader(&net, client, &addrs, 3, FORM_BOUND);
    let c = net.client(client);
    let f = addrs.iter().position(|a| *a != leader).expect("a follower");
    net.procs[procs[f]].kill9();
    // Several snapshots' worth of writes while it is down; each purges all but 2 entries.
    let written: Vec<String> = (0..30).map(|i| format!("while-down-{i}")).collect();
    for name in &written {
        assert!(c.register(&leader, name, Duration::from_secs(20)), "register {name}");
    }
    net.restart(procs[f]);
    wait_for("the restarted follower to have every job", FORM_BOUND, || {
        let ids = c.job_ids(&addrs[f], true)?;
        written.iter().all(|n| ids.contains(n)).then_some(())
    });
    let log = net.log_tail(procs[f], 5000);
    assert!(log.contains("installed raft snapshot"), "the follower caught up without a snapshot:\n{}", net.log_tail(procs[f], 40));
}

/// An agent that knows all three servers keeps its node ready and its task running (same
/// allocation, same PID, no replacement) when the leader is killed, and runs new work placed
/// by the next leader.
#[test]
fn ha_agent_fails_over_between_servers_and_keeps_its_tasks() {
    require_netns!();
    let mut flags: Vec<&str> = multihost::RAFT_FLAGS.to_vec();
    flags.extend(["--heartbeat-ttl", "2"]);
    let (mut net, procs, addrs, client) = cluster_with(3, &flags);
    let agent = net.add_host("agent");
    let all = addrs.join(",");
    let leader = wait_leader(&net, client, &addrs, 3, FORM_BOUND);
    multihost::start_agent(&mut net, agent, &all, 0);
    let c = net.client(client);
    multihost::wait_ready_nodes(&c, &all, 1, FORM_BOUND);
    let spec = net.path("svc.hcl");
    std::fs::write(&spec, multihost::SLEEP_SERVICE_JOB).unwrap();
    let out = c.mlp(&["job", "run", "--detach", "--address", &all, &spec.display().to_string()], Duration::from_secs(20)).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (id, _, _, _, pid) =
        wait_for("the allocation running", FORM_BOUND, || c.allocs(&all, "svc")?.into_iter().find(|a| a.2 == "running" && a.4 != 0));

    net.procs[procs[server_index(&addrs, &leader)]].kill9();
    let survivors: Vec<String> = addrs.iter().filter(|a| **a != leader).cloned().collect();
    let new_leader = wait_for("a new leader", FORM_BOUND, || {
        survivors.iter().find_map(|a| list_peers(&net, client, a)?.into_iter().find(|p| p.leader && p.address != leader))
    });
    let rest = survivors.join(",");
    // Three heartbeat TTLs after the new leader took over: still one ready node, the same
    // allocation running with the same process, nothing lost or replaced.
    let settle = Instant::now() + Duration::from_secs(6);
    while Instant::now() < settle {
        if let Some(nodes) = multihost::nodes(&c, &rest) {
            assert!(nodes.iter().all(|n| n.2 == "ready"), "node not ready after the failover: {nodes:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let list = wait_for("the allocations", FORM_BOUND, || c.allocs(&rest, "svc"));
    assert_eq!(list.len(), 1, "a replacement was made: {list:?}");
    assert_eq!((list[0].0.as_str(), list[0].2.as_str(), list[0].4), (id.as_str(), "running", pid), "{list:?}");
    assert!(alive(pid), "the task died with the leader");
    // New work placed by the new leader runs on the agent.
    let job2 = c.dir.join("after.hcl");
    std::fs::write(&job2, multihost::SLEEP_SERVICE_JOB.replace("job \"svc\"", "job \"after\"")).unwrap();
    let out = c.mlp(&["job", "run", "--detach", "--address", &rest, &job2.display().to_string()], Duration::from_secs(20)).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("the new job running after the failover", FORM_BOUND, || c.allocs(&rest, "after")?.into_iter().find(|a| a.2 == "running"));
    eprintln!("agent failover: leader {leader} killed, new leader {}", new_leader.address);
}

/// MLflow tracking is replicated state (issue 17 §4): a client logs metric points through all
/// three servers' MLflow API while the leader is killed with kill -9; every point a server
/// acknowledged is in the run's history afterwards, read from a survivor.
#[test]
fn ha_tracking_survives_a_leader_kill() {
    require_netns!();
    let (mut net, procs, addrs, client) = cluster(3);
    let leader = wait_leader(&net, client, &addrs, 3, FORM_BOUND);
    let http: Vec<String> = (0..3).map(|i| format!("{}:{}", net.hosts[i].ip, multihost::HTTP_PORT)).collect();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("mlflow").join("logger.py");
    let stop = net.path("logger.stop");
    let out = net.path("logger.out");
    let mut logger = std::process::Command::new("ip")
        .args(["netns", "exec", &net.hosts[client].ns, "python3"])
        .arg(&script)
        .arg(&stop)
        .args(&http)
        .stdout(std::fs::File::create(&out).expect("logger output"))
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start the logger (python3)");
    let acked = || -> Vec<u64> {
        std::fs::read_to_string(&out).unwrap_or_default().lines().filter_map(|l| l.strip_prefix("ack ")?.parse().ok()).collect()
    };
    wait_for("points logged before the kill", Duration::from_secs(60), || (acked().len() >= 30).then_some(()));
    let before = acked().len();
    let old_id = server_id(&net, client, &leader);
    net.procs[procs[server_index(&addrs, &leader)]].kill9();
    let survivors: Vec<String> = addrs.iter().filter(|a| **a != leader).cloned().collect();
    new_leader_among(&net, client, &survivors, old_id, FAILOVER_BOUND);
    wait_for("points logged after the kill", Duration::from_secs(60), || (acked().len() >= before + 30).then_some(()));
    std::fs::write(&stop, b"").expect("stop file");
    let status = wait_for("the logger to stop", Duration::from_secs(30), || logger.try_wait().ok().flatten());
    assert!(status.success(), "the logger failed: {status:?}");
    let text = std::fs::read_to_string(&out).expect("logger output");
    let run_id = text.lines().find_map(|l| l.strip_prefix("run ")).expect("the run id").to_string();
    let acked = acked();

    let survivor_http: Vec<String> =
        http.iter().filter(|h| !h.starts_with(&format!("{}:", leader.split(':').next().unwrap_or_default()))).cloned().collect();
    let history = std::process::Command::new("ip")
        .args(["netns", "exec", &net.hosts[client].ns, "python3"])
        .arg(&script)
        .args(["--history", &run_id])
        .args(&survivor_http)
        .output()
        .expect("read the history");
    assert!(history.status.success(), "{}", String::from_utf8_lossy(&history.stderr));
    let logged: std::collections::BTreeSet<u64> =
        String::from_utf8_lossy(&history.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect();
    let lost: Vec<u64> = acked.iter().copied().filter(|s| !logged.contains(s)).collect();
    assert!(lost.is_empty(), "acknowledged points missing after the leader kill: {lost:?} (of {} acknowledged)", acked.len());
    eprintln!("{} points acknowledged ({before} before the kill), {} in the history", acked.len(), logged.len());
}
