//! Service discovery on the agent (issue 13 §3): registrations of the node's allocations with
//! their health, and the DNS responder that answers for the whole cluster.
//!
//! * The manager sees every allocation update the agent reports (a copy of the UpdateAllocs
//!   stream, [`tee`]). An allocation whose group or tasks have `service` blocks gets a watcher
//!   ([`watch_alloc`]) that runs its checks ([`checks`]) while the service's task(s) run and
//!   sends the allocation's registrations (address, port, tags, passing/critical) whenever one
//!   of them changes; when the allocation ends the watcher deregisters it.
//! * [`send_loop`] coalesces those into `AgentService.UpdateServices` calls (latest per
//!   allocation wins, retried until sent); the servers replicate them through Raft.
//! * [`watch_loop`] follows `AgentService.WatchServices` (every passing instance of the cluster)
//!   into the [`dns::DnsTable`] that [`dns::serve`] answers from.
//!
//! A registration is sent only when its health, address, port or tags change (not on every
//! check run), so the output the servers show is that of the check run that changed the health.

pub mod checks;
pub mod dns;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mlp_proto::consts::{alloc_client, service_health, task_state};
use mlp_proto::v1::{
    AllocClientUpdate, AllocServices, AllocatedPort, Allocation, ServiceRegistration, ServiceSpec, TaskGroup, TaskState,
    UpdateServicesRequest, WatchServicesRequest,
};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

use crate::client::{Backoff, ServerPool};

/// What the watchers need from the agent.
pub struct ServicesEnv {
    /// `<data-dir>/allocs`: each allocation's state (`alloc::state`) holds the allocation with its job.
    pub alloc_root: PathBuf,
    /// The node's address (host-mode instances are registered on it).
    pub node_address: String,
    /// Bridge-mode allocations' networks (their addresses and namespaces).
    pub network: Option<Arc<crate::network::NetworkManager>>,
    /// The allocations the runners hold in memory (each is put there before its first update
    /// is sent).
    pub registry: crate::alloc::state::AllocRegistry,
}

/// Copies every update of `rx` to two receivers: the one UpdateAllocs sends from, and the
/// services manager's.
pub fn tee(
    mut rx: mpsc::UnboundedReceiver<AllocClientUpdate>,
) -> (mpsc::UnboundedReceiver<AllocClientUpdate>, mpsc::UnboundedReceiver<AllocClientUpdate>) {
    let (a_tx, a_rx) = mpsc::unbounded_channel();
    let (b_tx, b_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(u) = rx.recv().await {
            let _ = b_tx.send(u.clone());
            if a_tx.send(u).is_err() {
                return;
            }
        }
    });
    (a_rx, b_rx)
}

struct Tracked {
    states: watch::Sender<BTreeMap<String, TaskState>>,
    cancel: CancellationToken,
}

/// Starts a watcher for every live allocation reported, stops it when the allocation ends.
pub async fn manager_loop(
    env: Arc<ServicesEnv>,
    mut updates: mpsc::UnboundedReceiver<AllocClientUpdate>,
    out: mpsc::UnboundedSender<AllocServices>,
    cancel: CancellationToken,
) {
    let mut tracked: HashMap<String, Tracked> = HashMap::new();
    while let Some(u) = updates.recv().await {
        if alloc_client::is_terminal(&u.client_status) {
            if let Some(t) = tracked.remove(&u.alloc_id) {
                t.cancel.cancel();
            }
            continue;
        }
        if let Some(t) = tracked.get(&u.alloc_id) {
            t.states.send_replace(u.task_states);
            continue;
        }
        let (states_tx, states_rx) = watch::channel(u.task_states);
        let token = cancel.child_token();
        tokio::spawn(watch_alloc(env.clone(), u.alloc_id.clone(), states_rx, token.clone(), out.clone()));
        tracked.insert(u.alloc_id, Tracked { states: states_tx, cancel: token });
    }
}

/// One service instance being watched.
struct Instance {
    task: String,
    spec: ServiceSpec,
    results: Vec<Option<checks::CheckResult>>,
    next_due: Vec<Instant>,
}

/// The allocation with its job: the one its runner holds (put in the registry before the
/// first update is sent), else as persisted; a few tries cover a slow disk. Every allocation
/// gets here, most without a service, so the one in memory saves reading and parsing its
/// state files each time.
async fn load_alloc(env: &ServicesEnv, alloc_id: &str) -> Option<Arc<Allocation>> {
    if let Some(a) = env.registry.get(alloc_id).and_then(|v| v.alloc).filter(|a| a.job.is_some()) {
        return Some(a);
    }
    if crate::paths::check_alloc_id(alloc_id).is_err() {
        return None;
    }
    for _ in 0..40 {
        let dir = env.alloc_root.join(alloc_id);
        if let Ok(Some(p)) = crate::alloc::state::load(&dir) {
            if let Some(a) = p.alloc.filter(|a| a.job.is_some()) {
                return Some(Arc::new(a));
            }
        }
        sleep(Duration::from_millis(250)).await;
    }
    None
}

/// A `port` of a service or check: a number, or a label of the allocation's ports (bridge: the
/// port inside the allocation, `to`, else the host port; host mode: the host port).
pub fn resolve_port(port: &str, ports: &[AllocatedPort], bridge: bool) -> Option<u16> {
    if port.is_empty() {
        return None;
    }
    if let Ok(n) = port.parse::<u16>() {
        return Some(n);
    }
    let p = ports.iter().find(|p| p.label == port)?;
    let n = if bridge && p.to > 0 { p.to } else { p.host_port };
    u16::try_from(n).ok()
}

/// Whether the task(s) a service belongs to run: its task, or every task of the group.
fn running(task: &str, group: &TaskGroup, states: &BTreeMap<String, TaskState>) -> bool {
    let is_running = |t: &str| states.get(t).is_some_and(|s| s.state == task_state::RUNNING);
    if task.is_empty() {
        !group.tasks.is_empty() && group.tasks.iter().all(|t| is_running(&t.name))
    } else {
        is_running(task)
    }
}

/// Runs an allocation's checks and sends its registrations on every change, until cancelled
/// (the allocation ended), then deregisters it.
pub async fn watch_alloc(
    env: Arc<ServicesEnv>,
    alloc_id: String,
    mut states: watch::Receiver<BTreeMap<String, TaskState>>,
    cancel: CancellationToken,
    out: mpsc::UnboundedSender<AllocServices>,
) {
    let Some(alloc) = load_alloc(&env, &alloc_id).await else {
        tracing::warn!(alloc_id, "allocation not found on disk; its services are not registered");
        return;
    };
    let Some(group) = alloc.job.as_ref().and_then(|j| j.groups.iter().find(|g| g.name == alloc.task_group)).cloned() else { return };
    let now = Instant::now();
    let mut instances: Vec<Instance> = group
        .services
        .iter()
        .map(|s| (String::new(), s))
        .chain(group.tasks.iter().flat_map(|t| t.services.iter().map(move |s| (t.name.clone(), s))))
        .map(|(task, spec)| Instance {
            task,
            spec: spec.clone(),
            results: vec![None; spec.checks.len()],
            next_due: vec![now; spec.checks.len()],
        })
        .collect();
    if instances.is_empty() {
        return;
    }
    let bridge = group.network.as_ref().is_some_and(|n| n.mode == "bridge");
    let ports = alloc.resources.as_ref().map(|r| r.ports.clone()).unwrap_or_default();
    let alloc_dir = env.alloc_root.join(&alloc_id);
    let mut last_sent: Option<Vec<ServiceRegistration>> = None;
    loop {
        let task_states = states.borrow_and_update().clone();
        let (ip, netns) = if bridge {
            match env.network.as_ref().and_then(|n| n.load(&alloc_id)) {
                Some(net) => (Some(IpAddr::V4(net.ip)), Some(net.netns)),
                None => (None, None),
            }
        } else {
            (env.node_address.parse::<IpAddr>().ok(), None)
        };
        let now = Instant::now();
        let mut runs = Vec::new();
        for (i, inst) in instances.iter_mut().enumerate() {
            if !running(&inst.task, &group, &task_states) {
                inst.results.iter_mut().for_each(|r| *r = None);
                inst.next_due.iter_mut().for_each(|d| *d = now);
                continue;
            }
            for (c, check) in inst.spec.checks.iter().enumerate() {
                if inst.next_due[c] > now {
                    continue;
                }
                inst.next_due[c] = now + Duration::from_millis(check.interval_ms.max(100));
                let port_ref = if check.port.is_empty() { &inst.spec.port } else { &check.port };
                let addr = ip.zip(resolve_port(port_ref, &ports, bridge)).map(|(ip, p)| SocketAddr::new(ip, p));
                let target = checks::Target { addr, netns: netns.clone(), alloc_dir: alloc_dir.clone() };
                let check = check.clone();
                runs.push(async move { (i, c, checks::run(&check, &target).await) });
            }
        }
        if !runs.is_empty() {
            let results = tokio::select! {
                r = futures::future::join_all(runs) => r,
                _ = cancel.cancelled() => break,
            };
            for (i, c, r) in results {
                instances[i].results[c] = Some(r);
            }
        }
        if let Some(ip) = ip {
            let regs: Vec<ServiceRegistration> =
                instances.iter().map(|inst| registration(&alloc, inst, ip, &ports, bridge, &group, &task_states)).collect();
            let changed = last_sent.as_ref().is_none_or(|prev| {
                prev.len() != regs.len()
                    || prev.iter().zip(&regs).any(|(a, b)| {
                        ServiceRegistration { output: String::new(), ..a.clone() }
                            != ServiceRegistration { output: String::new(), ..b.clone() }
                    })
            });
            if changed {
                tracing::debug!(
                    alloc_id,
                    passing = regs.iter().filter(|r| r.health == service_health::PASSING).count(),
                    "service registrations changed"
                );
                if out.send(AllocServices { alloc_id: alloc_id.clone(), services: regs.clone() }).is_err() {
                    return;
                }
                last_sent = Some(regs);
            }
        }
        let next = instances
            .iter()
            .filter(|inst| running(&inst.task, &group, &task_states))
            .flat_map(|inst| inst.next_due.iter().copied())
            .min()
            // Waiting for the network record (bridge mode, set up after the first update).
            .or_else(|| ip.is_none().then(|| Instant::now() + Duration::from_millis(200)))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            changed = states.changed() => if changed.is_err() { break },
            _ = cancel.cancelled() => break,
        }
    }
    let _ = out.send(AllocServices { alloc_id, services: Vec::new() });
}

/// One instance's registration as it stands.
fn registration(
    alloc: &Allocation,
    inst: &Instance,
    ip: IpAddr,
    ports: &[AllocatedPort],
    bridge: bool,
    group: &TaskGroup,
    states: &BTreeMap<String, TaskState>,
) -> ServiceRegistration {
    let (health, output) = if !running(&inst.task, group, states) {
        let what = if inst.task.is_empty() {
            "the group's tasks are not all running".to_string()
        } else {
            format!("task {} is not running", inst.task)
        };
        (service_health::CRITICAL, what)
    } else if inst.results.is_empty() {
        (service_health::PASSING, "no checks; the task runs".to_string())
    } else if let Some(failed) = inst.results.iter().find(|r| !r.as_ref().is_some_and(|r| r.passing)) {
        (service_health::CRITICAL, failed.as_ref().map_or_else(|| "not checked yet".to_string(), |r| r.output.clone()))
    } else {
        let out = inst.results.iter().flatten().map(|r| r.output.as_str()).collect::<Vec<_>>().join("\n");
        (service_health::PASSING, out)
    };
    ServiceRegistration {
        id: format!("{}/{}/{}", alloc.id, inst.task, inst.spec.name),
        service_name: inst.spec.name.clone(),
        namespace: alloc.namespace.clone(),
        job_id: alloc.job_id.clone(),
        alloc_id: alloc.id.clone(),
        node_id: alloc.node_id.clone(),
        task: inst.task.clone(),
        address: ip.to_string(),
        port: resolve_port(&inst.spec.port, ports, bridge).map_or(0, u32::from),
        tags: inst.spec.tags.clone(),
        health: health.to_string(),
        output,
        ..Default::default()
    }
}

/// How long registration changes are batched before one UpdateServices.
const COALESCE: Duration = Duration::from_millis(5);
/// Timeout of one UpdateServices call.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

impl crate::client::Keyed for AllocServices {
    fn key(&self) -> &str {
        &self.alloc_id
    }
}

/// Sends registration changes: latest per allocation wins, batched (what arrives within
/// [`COALESCE`], see `client::gather`), retried with backoff until sent or refused.
pub async fn send_loop(pool: Arc<ServerPool>, node_id: String, mut rx: mpsc::UnboundedReceiver<AllocServices>) {
    use crate::client::{collect_until, gather};
    let mut pending: BTreeMap<String, AllocServices> = BTreeMap::new();
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    let mut open = true;
    loop {
        if pending.is_empty() {
            let Some(u) = rx.recv().await else { return };
            pending.insert(u.alloc_id.clone(), u);
        }
        gather(&mut rx, &mut pending, &mut open, COALESCE, |_| false).await;
        let Some((idx, mut client)) = pool.client() else { return };
        let req = UpdateServicesRequest { node_id: node_id.clone(), allocs: pending.values().cloned().collect() };
        let res = match tokio::time::timeout(RPC_TIMEOUT, client.update_services(req)).await {
            Ok(r) => r.map(drop),
            Err(_) => Err(tonic::Status::deadline_exceeded("UpdateServices timed out")),
        };
        match res {
            Ok(()) => {
                pending.clear();
                backoff.reset();
            }
            Err(st) if st.code() == tonic::Code::InvalidArgument => {
                // The servers will never take this batch: drop it rather than retry forever.
                tracing::warn!(error = %st.message(), "service registrations refused");
                pending.clear();
            }
            Err(st) => {
                if st.code() != tonic::Code::NotFound {
                    pool.failover(idx);
                }
                let d = backoff.next_delay();
                tracing::warn!(code = ?st.code(), error = %st.message(), retry_in = ?d, "sending service registrations failed");
                // Keep collecting (latest per allocation wins) while waiting to retry.
                collect_until(&mut rx, &mut pending, &mut open, Instant::now() + d).await;
            }
        }
        if !open && pending.is_empty() {
            return;
        }
    }
}

/// Follows `WatchServices` (reconnecting with backoff, failing over) into `table`.
pub async fn watch_loop(pool: Arc<ServerPool>, node_id: String, table: watch::Sender<Arc<dns::DnsTable>>) {
    let open = |mut c: crate::client::AgentClient| {
        let req = WatchServicesRequest { node_id: node_id.clone() };
        async move { c.watch_services(req).await }
    };
    let table = &table;
    crate::client::follow_stream(&pool, "services", open, |msg: mlp_proto::v1::ServiceInstances| async move {
        let t = dns::DnsTable::from_instances(&msg.instances);
        table.send_if_modified(|cur| {
            if **cur == t {
                return false;
            }
            *cur = Arc::new(t);
            true
        });
    })
    .await;
}

/// The DNS responder's address for bridge networking: the bridge's gateway, port 53.
pub fn dns_addr(settings: &crate::network::NetworkSettings) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(settings.subnet.gateway()), 53)
}

/// Serves DNS on the gateway of the node's subnet: once the node is registered (the servers
/// may lease it another subnet than the configured one), and again on the new gateway if a
/// later registration changes the lease.
pub async fn dns_loop(network: Arc<crate::network::NetworkManager>, mut registered: watch::Receiver<bool>, responder: Arc<dns::Responder>) {
    if registered.wait_for(|r| *r).await.is_err() {
        return;
    }
    loop {
        let addr = dns_addr(&network.settings());
        let serving = dns::serve(addr, responder.clone());
        tokio::pin!(serving);
        loop {
            tokio::select! {
                r = &mut serving => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "no DNS responder: bridge-mode tasks cannot resolve service names");
                    }
                    // Not serving: try again after the next registration.
                    if registered.changed().await.is_err() {
                        return;
                    }
                    break;
                }
                changed = registered.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if dns_addr(&network.settings()) != addr {
                        tracing::info!(from = %addr, "the node's subnet changed; moving the DNS responder");
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_allocation_comes_from_its_runner_without_reading_the_disk() {
        use crate::alloc::state::{AllocRegistry, AllocView};
        use mlp_proto::v1::Job;
        let registry = AllocRegistry::default();
        let env = ServicesEnv {
            // Nothing on disk: only the registry can answer.
            alloc_root: PathBuf::from("/nonexistent/allocs"),
            node_address: "127.0.0.1".into(),
            network: None,
            registry: registry.clone(),
        };
        let alloc = Allocation {
            id: "a1".into(),
            task_group: "g".into(),
            job: Some(Job { name: "j".into(), ..Default::default() }),
            ..Default::default()
        };
        registry.put("a1", AllocView { alloc: Some(Arc::new(alloc.clone())), ..Default::default() });
        assert_eq!(load_alloc(&env, "a1").await.as_deref(), Some(&alloc));
    }

    #[test]
    fn ports_resolve_by_label_or_number() {
        let ports = vec![
            AllocatedPort { label: "http".into(), host_port: 23_000, to: 8080 },
            AllocatedPort { label: "raw".into(), host_port: 23_001, to: 0 },
        ];
        assert_eq!(resolve_port("http", &ports, true), Some(8080));
        assert_eq!(resolve_port("http", &ports, false), Some(23_000));
        assert_eq!(resolve_port("raw", &ports, true), Some(23_001));
        assert_eq!(resolve_port("9000", &ports, true), Some(9000));
        assert_eq!(resolve_port("nope", &ports, true), None);
        assert_eq!(resolve_port("", &ports, true), None);
    }

    #[test]
    fn group_services_need_every_task_running() {
        let group = TaskGroup {
            tasks: vec![
                mlp_proto::v1::Task { name: "a".into(), ..Default::default() },
                mlp_proto::v1::Task { name: "b".into(), ..Default::default() },
            ],
            ..Default::default()
        };
        let st = |s: &str| TaskState { state: s.into(), ..Default::default() };
        let mut states = BTreeMap::from([("a".to_string(), st("running")), ("b".to_string(), st("pending"))]);
        assert!(running("a", &group, &states));
        assert!(!running("", &group, &states));
        states.insert("b".into(), st("running"));
        assert!(running("", &group, &states));
    }
}
