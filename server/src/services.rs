//! Service discovery in the replicated state (issue 13 §3): the registrations agents make from
//! their allocations' `service` blocks, how `apply` keeps them, and the reads the API, the
//! agents' DNS responders and the event stream make of them.
//!
//! A registration lives only as long as its allocation is live (desired `run`, not finished):
//! `UpdateServices` refuses others, and every entry that ends, stops or removes an allocation
//! drops its registrations in the same `apply` (so a stopped job leaves DNS and the API at the
//! entry that stopped it, whatever its agent does).

use std::collections::{BTreeMap, BTreeSet};

use mlp_proto::consts::service_health;
use mlp_proto::v1::{AllocServices, ServiceRegistration, ServiceSummary};

use mlp_proto::v1::{
    GetServiceRequest, GetServiceResponse, ListServicesRequest, ListServicesResponse, ServiceInstances, UpdateServicesRequest,
    UpdateServicesResponse,
};

use crate::api::{require_id, Api, ApiError, Block};
use crate::events::TOPIC_SERVICE;
use crate::leader::now_ms;
use crate::scheduler::resources::is_live;
use crate::state::{ClusterState, Command, Request};

/// Registrations one allocation may hold (the job spec allows at most this many `service`
/// blocks per group).
pub const MAX_SERVICES_PER_ALLOC: usize = mlp_proto::jobspec::limits::MAX_SERVICES;
/// Bytes of a registration's check output kept in the state.
pub const MAX_OUTPUT_BYTES: usize = 1024;

/// A registration's id: `<alloc id>/<task or "">/<service name>`.
pub fn registration_id(alloc_id: &str, task: &str, name: &str) -> String {
    format!("{alloc_id}/{task}/{name}")
}

/// The same registration apart from its indexes.
fn same(a: &ServiceRegistration, b: &ServiceRegistration) -> bool {
    let strip = |r: &ServiceRegistration| ServiceRegistration { create_index: 0, modify_index: 0, ..r.clone() };
    strip(a) == strip(b)
}

impl ClusterState {
    /// Applies an agent's registrations (see `Command::UpdateServices`).
    pub(crate) fn update_services(&mut self, index: u64, node_id: &str, allocs: &[AllocServices]) {
        for upd in allocs {
            let Some(alloc) = self.allocs.get(&upd.alloc_id) else { continue };
            if alloc.node_id != node_id {
                continue; // checked by the API too; a node never writes another's allocation
            }
            let live = is_live(alloc);
            let old = self.services.remove(&upd.alloc_id).unwrap_or_default();
            let mut new: Vec<ServiceRegistration> = Vec::new();
            if live {
                for r in upd.services.iter().take(MAX_SERVICES_PER_ALLOC) {
                    let mut r = r.clone();
                    r.id = registration_id(&alloc.id, &r.task, &r.service_name);
                    r.alloc_id = alloc.id.clone();
                    r.node_id = node_id.to_string();
                    r.namespace = alloc.namespace.clone();
                    r.job_id = alloc.job_id.clone();
                    if r.output.len() > MAX_OUTPUT_BYTES {
                        let mut end = MAX_OUTPUT_BYTES;
                        while !r.output.is_char_boundary(end) {
                            end -= 1;
                        }
                        r.output.truncate(end);
                    }
                    if new.iter().any(|n| n.id == r.id) {
                        continue;
                    }
                    match old.iter().find(|o| o.id == r.id) {
                        Some(o) if same(o, &r) => r = o.clone(),
                        Some(o) => {
                            r.create_index = o.create_index;
                            r.modify_index = index;
                        }
                        None => {
                            r.create_index = index;
                            r.modify_index = index;
                        }
                    }
                    new.push(r);
                }
            }
            for o in &old {
                if !new.iter().any(|n| n.id == o.id && n.modify_index == o.modify_index) {
                    self.touched.services.insert((o.namespace.clone(), o.service_name.clone()));
                }
            }
            for n in &new {
                if n.modify_index == index {
                    self.touched.services.insert((n.namespace.clone(), n.service_name.clone()));
                }
            }
            if !new.is_empty() {
                self.services.insert(upd.alloc_id.clone(), new);
            }
        }
    }

    /// Drops the registrations of the allocations this entry ended, stopped or removed.
    pub(crate) fn drop_dead_services(&mut self) {
        if self.services.is_empty() {
            return;
        }
        let removed = self.touched.deleted.iter().filter(|d| d.topic == "Allocation").map(|d| &d.key);
        let dead: Vec<String> = self
            .touched
            .allocs
            .iter()
            .filter(|id| self.allocs.get(*id).is_none_or(|a| !is_live(a)))
            .chain(removed)
            .filter(|id| self.services.contains_key(*id))
            .cloned()
            .collect();
        for id in dead {
            for r in self.services.remove(&id).unwrap_or_default() {
                self.touched.services.insert((r.namespace, r.service_name));
            }
        }
    }

    /// Every registration, in (namespace, name, id) order.
    pub fn service_registrations(&self) -> Vec<&ServiceRegistration> {
        let mut all: Vec<&ServiceRegistration> = self.services.values().flatten().collect();
        all.sort_by(|a, b| (&a.namespace, &a.service_name, &a.id).cmp(&(&b.namespace, &b.service_name, &b.id)));
        all
    }

    /// The instances of one service in `namespace` ("" = every namespace); `passing` leaves out
    /// the critical ones.
    pub fn service_instances(&self, namespace: &str, name: &str, passing: bool) -> Vec<ServiceRegistration> {
        self.service_registrations()
            .into_iter()
            .filter(|r| r.service_name == name && (namespace.is_empty() || r.namespace == namespace))
            .filter(|r| !passing || r.health == service_health::PASSING)
            .cloned()
            .collect()
    }

    /// One line per (namespace, service): instance counts and the union of the tags.
    pub fn service_summaries(&self, namespace: &str) -> Vec<ServiceSummary> {
        let mut out: BTreeMap<(String, String), (BTreeSet<String>, u32, u32)> = BTreeMap::new();
        for r in self.service_registrations() {
            if !namespace.is_empty() && r.namespace != namespace {
                continue;
            }
            let e = out.entry((r.namespace.clone(), r.service_name.clone())).or_default();
            e.0.extend(r.tags.iter().cloned());
            e.1 += 1;
            if r.health == service_health::PASSING {
                e.2 += 1;
            }
        }
        out.into_iter()
            .map(|((namespace, name), (tags, instances, passing))| ServiceSummary {
                name,
                namespace,
                tags: tags.into_iter().collect(),
                instances,
                passing,
            })
            .collect()
    }

    /// Every passing instance of the cluster (what the agents' DNS responders answer from).
    pub fn passing_instances(&self) -> Vec<ServiceRegistration> {
        self.service_registrations().into_iter().filter(|r| r.health == service_health::PASSING).cloned().collect()
    }
}

// ---- the API (gRPC ServiceService, HTTP /v1/services, /v1/service/NAME, the agents' RPCs) ----

/// Allocations one UpdateServices may name.
pub const MAX_ALLOCS_PER_UPDATE: usize = 1_000;

fn bad(msg: String) -> ApiError {
    ApiError::InvalidArgument(msg)
}

/// Checks one registration as an agent sent it (the server fills ids, node, job, namespace).
fn check_registration(at: &str, r: &ServiceRegistration) -> Result<(), ApiError> {
    if !mlp_proto::jobspec::is_dns_label(&r.service_name) {
        return Err(bad(format!("{at}.service_name {:?} is not a DNS label", r.service_name.chars().take(80).collect::<String>())));
    }
    if r.task.len() > 128 || r.task.chars().any(|c| c.is_control() || c == '/') {
        return Err(bad(format!("{at}.task is not a task name")));
    }
    if r.address.parse::<std::net::IpAddr>().is_err() {
        return Err(bad(format!("{at}.address {:?} is not an IP address", r.address.chars().take(80).collect::<String>())));
    }
    if r.port > 65535 {
        return Err(bad(format!("{at}.port {} is above 65535", r.port)));
    }
    if r.tags.len() > mlp_proto::jobspec::limits::MAX_TAGS
        || r.tags.iter().any(|t| t.len() > mlp_proto::jobspec::limits::MAX_TAG_BYTES || t.chars().any(char::is_control))
    {
        return Err(bad(format!(
            "{at}.tags: at most {} tags of at most {} bytes",
            mlp_proto::jobspec::limits::MAX_TAGS,
            mlp_proto::jobspec::limits::MAX_TAG_BYTES
        )));
    }
    if !matches!(r.health.as_str(), service_health::PASSING | service_health::CRITICAL) {
        return Err(bad(format!("{at}.health {:?} is not one of passing, critical", r.health.chars().take(80).collect::<String>())));
    }
    if r.output.len() > 64 * 1024 {
        return Err(bad(format!("{at}.output is {} bytes, at most 65536", r.output.len())));
    }
    Ok(())
}

impl Api {
    /// An agent's registrations: the node must be registered and own every allocation named.
    pub async fn update_services(&self, mut req: UpdateServicesRequest) -> Result<UpdateServicesResponse, ApiError> {
        require_id("node_id", &req.node_id)?;
        if req.allocs.len() > MAX_ALLOCS_PER_UPDATE {
            return Err(bad(format!("allocs: {} given, at most {MAX_ALLOCS_PER_UPDATE}", req.allocs.len())));
        }
        let index = {
            let st = self.state.read();
            if !st.nodes.contains_key(&req.node_id) {
                return Err(ApiError::NotFound(format!("node {:?} is not registered", req.node_id)));
            }
            for a in &req.allocs {
                require_id("allocs[].alloc_id", &a.alloc_id)?;
                if a.services.len() > MAX_SERVICES_PER_ALLOC {
                    return Err(bad(format!(
                        "allocs[{}].services: {} given, at most {MAX_SERVICES_PER_ALLOC}",
                        a.alloc_id,
                        a.services.len()
                    )));
                }
                for (i, r) in a.services.iter().enumerate() {
                    check_registration(&format!("allocs[{}].services[{i}]", a.alloc_id), r)?;
                }
                if let Some(alloc) = st.allocs.get(&a.alloc_id) {
                    if alloc.node_id != req.node_id {
                        return Err(bad(format!("allocation {} belongs to another node", a.alloc_id)));
                    }
                }
            }
            // Allocations already collected, and deregistrations of allocations that hold
            // nothing, are no news.
            req.allocs.retain(|a| st.allocs.contains_key(&a.alloc_id) && (!a.services.is_empty() || st.services.contains_key(&a.alloc_id)));
            st.index
        };
        if req.allocs.is_empty() {
            return Ok(UpdateServicesResponse { index });
        }
        let resp = self
            .raft
            .submit(Request { now_ms: now_ms(), command: Command::UpdateServices { node_id: req.node_id, allocs: req.allocs } })
            .await?;
        Ok(UpdateServicesResponse { index: resp.index })
    }

    /// Every service, with its instance counts (a blocking query on the Service topic).
    pub async fn list_services(&self, req: ListServicesRequest) -> Result<ListServicesResponse, ApiError> {
        if req.namespace.len() > 256 {
            return Err(bad("namespace is longer than 256 bytes".into()));
        }
        let b = Block { min_index: req.min_index, wait_ms: req.wait_ms };
        self.block(b, &[(TOPIC_SERVICE, "")], &req.namespace).await?;
        self.read_barrier(false).await?;
        let st = self.state.read();
        Ok(ListServicesResponse { services: st.service_summaries(&req.namespace), index: st.index })
    }

    /// One service's instances in a namespace (default `default`), passing ones only with
    /// `passing`; not found when it has none.
    pub async fn get_service(&self, req: GetServiceRequest) -> Result<GetServiceResponse, ApiError> {
        if !mlp_proto::jobspec::is_dns_label(&req.name) {
            return Err(bad(format!("service name {:?} is not a DNS label", req.name.chars().take(80).collect::<String>())));
        }
        if req.namespace.len() > 256 {
            return Err(bad("namespace is longer than 256 bytes".into()));
        }
        let ns = if req.namespace.is_empty() { "default" } else { req.namespace.as_str() };
        let b = Block { min_index: req.min_index, wait_ms: req.wait_ms };
        self.block(b, &[(TOPIC_SERVICE, req.name.as_str())], ns).await?;
        self.read_barrier(false).await?;
        let st = self.state.read();
        let instances = st.service_instances(ns, &req.name, req.passing);
        if instances.is_empty()
            && b.min_index == 0
            && !st.service_registrations().iter().any(|r| r.namespace == ns && r.service_name == req.name)
        {
            return Err(ApiError::NotFound(format!("service {:?} has no instances in namespace {ns:?}", req.name)));
        }
        Ok(GetServiceResponse { instances, index: st.index })
    }

    /// Every passing instance of the cluster and the state's index (for the agents).
    pub fn passing_instances(&self) -> ServiceInstances {
        let st = self.state.read();
        ServiceInstances { instances: st.passing_instances(), index: st.index }
    }

    /// Feeds `WatchServices`: the passing instances now, then again after every entry that
    /// changed a service (a subscription that is cut off or reset re-reads and goes on; an idle
    /// stream repeats the last set every `events::HEARTBEAT`, so a dead connection is noticed).
    pub fn watch_services(api: std::sync::Arc<Api>) -> tokio::sync::mpsc::Receiver<Result<ServiceInstances, ApiError>> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let filter =
                || crate::events::Filter::new(&[mlp_proto::v1::EventTopic { topic: TOPIC_SERVICE.into(), key: String::new() }], "");
            let mut last: Option<Vec<ServiceRegistration>> = None;
            loop {
                let now = api.passing_instances();
                let sub = filter().ok().and_then(|f| api.state.events().subscribe(now.index, f).ok());
                if last.as_ref() != Some(&now.instances) {
                    last = Some(now.instances.clone());
                    if tx.send(Ok(now)).await.is_err() {
                        return;
                    }
                }
                let Some(mut sub) = sub else {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                };
                tokio::select! {
                    r = sub.next() => {
                        if matches!(r, Err(crate::events::EventError::Closed)) {
                            let _ = tx.send(Err(ApiError::Unavailable("the server is shutting down".into()))).await;
                            return;
                        }
                    }
                    _ = tokio::time::sleep(crate::events::HEARTBEAT) => last = None,
                    _ = tx.closed() => return,
                }
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use mlp_proto::consts::{alloc_client, alloc_desired};
    use mlp_proto::v1::{AllocServices, Allocation, ServiceRegistration};

    use crate::state::{ClusterState, Command, Request};

    fn alloc(id: &str, node: &str) -> Allocation {
        Allocation {
            id: id.into(),
            node_id: node.into(),
            namespace: "default".into(),
            job_id: "web".into(),
            desired_status: alloc_desired::RUN.into(),
            client_status: alloc_client::RUNNING.into(),
            ..Default::default()
        }
    }

    fn reg(name: &str, health: &str) -> ServiceRegistration {
        ServiceRegistration { service_name: name.into(), address: "10.0.0.2".into(), port: 80, health: health.into(), ..Default::default() }
    }

    fn update(st: &mut ClusterState, index: u64, node: &str, alloc: &str, regs: Vec<ServiceRegistration>) {
        let cmd = Command::UpdateServices { node_id: node.into(), allocs: vec![AllocServices { alloc_id: alloc.into(), services: regs }] };
        st.apply(index, &Request { now_ms: 1, command: cmd }, &mut Vec::new());
    }

    fn state() -> ClusterState {
        let mut st = ClusterState::default();
        for (id, node) in [("a1", "n1"), ("a2", "n2")] {
            st.allocs.insert(id.into(), alloc(id, node));
        }
        st.rebuild_indexes();
        st
    }

    #[test]
    fn registrations_are_kept_per_alloc_and_only_from_their_node() {
        let mut st = state();
        update(&mut st, 2, "n1", "a1", vec![reg("web", "passing")]);
        assert_eq!(st.touched.services.len(), 1, "a new instance is a change");
        update(&mut st, 3, "n1", "a2", vec![reg("web", "passing")]);
        assert!(st.touched.services.is_empty(), "another node's allocation is refused");
        let web = st.service_instances("default", "web", false);
        assert_eq!(web.len(), 1);
        assert_eq!(web[0].id, "a1//web");
        assert_eq!((web[0].alloc_id.as_str(), web[0].job_id.as_str(), web[0].create_index), ("a1", "web", 2));
        update(&mut st, 4, "n1", "a1", vec![reg("web", "passing")]);
        assert!(st.touched.services.is_empty(), "an unchanged registration is no change");
        update(&mut st, 5, "n1", "a1", vec![reg("web", "critical")]);
        assert_eq!(st.touched.services.len(), 1);
        assert!(st.service_instances("default", "web", true).is_empty(), "a critical instance is not passing");
        assert_eq!(st.service_instances("default", "web", false)[0].modify_index, 5);
        let sum = st.service_summaries("");
        assert_eq!((sum.len(), sum[0].instances, sum[0].passing), (1, 1, 0));
    }

    #[test]
    fn an_ended_or_stopped_allocation_loses_its_registrations() {
        let mut st = state();
        update(&mut st, 2, "n1", "a1", vec![reg("web", "passing")]);
        update(&mut st, 3, "n2", "a2", vec![reg("web", "passing")]);
        assert_eq!(st.passing_instances().len(), 2);
        let done =
            mlp_proto::v1::AllocClientUpdate { alloc_id: "a1".into(), client_status: alloc_client::COMPLETE.into(), ..Default::default() };
        let cmd = Command::UpdateAllocsFromClient { node_id: "n1".into(), updates: vec![done] };
        st.apply(4, &Request { now_ms: 1, command: cmd }, &mut Vec::new());
        assert_eq!(st.touched.services.len(), 1);
        assert_eq!(st.passing_instances().len(), 1, "the finished allocation's instance is gone");
        update(&mut st, 5, "n1", "a1", vec![reg("web", "passing")]);
        assert_eq!(st.passing_instances().len(), 1, "a finished allocation cannot register again");
    }
}
