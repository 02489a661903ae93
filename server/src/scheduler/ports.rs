//! Host ports as a node resource (issue 13 §1) and the rendezvous of gang members (§4).
//!
//! A group's `network` ports are held on the node its allocation is placed on: a static port
//! exactly, a dynamic one picked here from the node's range (`NodeResources.min_dynamic_port`
//! ..= `max_dynamic_port`, default [`DEFAULT_DYNAMIC_PORTS`]). The pick is the lowest port of
//! the range that no allocation on the node (this plan's included) holds, so it is
//! deterministic for a given state; two plans computed at once may pick the same port, and the
//! plan applier's re-check (`Usage::add` counts a port held twice as a conflict) rejects the
//! later one. Groups without ports never reach this module.

use mlp_proto::v1::{AllocatedPort, Allocation, GangRendezvous, Node, NodeResources, PortSpec};

use super::resources::Usage;

/// Dynamic host ports when the node reports no range (Nomad's default range is 20000-32000).
pub const DEFAULT_DYNAMIC_PORTS: (u32, u32) = (20_000, 32_000);

/// The master port a gang's members are told when rank 0 maps no port (PyTorch's default).
pub const DEFAULT_RENDEZVOUS_PORT: u32 = 29_500;

/// The node's dynamic range, or the default when it reports none (or an empty one).
pub fn dynamic_range(cap: &NodeResources) -> (u32, u32) {
    let (lo, hi) = (cap.min_dynamic_port, cap.max_dynamic_port);
    if lo == 0 || hi < lo || hi > 65_535 {
        DEFAULT_DYNAMIC_PORTS
    } else {
        (lo, hi)
    }
}

/// Host ports for `asks` on top of `usage` (which gets them): static ones as asked (a port
/// already held counts in `port_conflicts`), then dynamic ones, lowest free first (none free
/// counts in `port_shortfall`). The result lists the ports in the group's order.
pub fn assign(cap: &NodeResources, asks: &[PortSpec], usage: &mut Usage) -> Vec<AllocatedPort> {
    let mut out = vec![AllocatedPort::default(); asks.len()];
    for (slot, ask) in out.iter_mut().zip(asks).filter(|(_, a)| a.static_port > 0) {
        if !usage.ports.insert(ask.static_port) {
            usage.port_conflicts = usage.port_conflicts.saturating_add(1);
        }
        *slot = port(ask, ask.static_port);
    }
    let (lo, hi) = dynamic_range(cap);
    let mut next = lo;
    for (slot, ask) in out.iter_mut().zip(asks).filter(|(_, a)| a.static_port == 0) {
        while next <= hi && usage.ports.contains(&next) {
            next += 1;
        }
        if next > hi {
            usage.port_shortfall = usage.port_shortfall.saturating_add(1);
            *slot = port(ask, 0);
            continue;
        }
        usage.ports.insert(next);
        *slot = port(ask, next);
    }
    out
}

/// An allocated port: inside the allocation, `to`, or the host port itself when not set.
fn port(ask: &PortSpec, host_port: u32) -> AllocatedPort {
    AllocatedPort { label: ask.label.clone(), host_port, to: if ask.to > 0 { ask.to } else { host_port } }
}

/// The address part of a node's `rpc_addr` ([`mlp_proto::node_address`]).
pub fn node_address(node: &Node) -> String {
    mlp_proto::node_address(&node.rpc_addr)
}

/// Fills the rendezvous of a gang's new `placed` members, given the members that stay
/// (`live`): rank = index, size = `size`, leader = the member of index 0 (its node's address
/// and its first port on the host, [`DEFAULT_RENDEZVOUS_PORT`] without ports). When no member
/// has index 0 (it is being replaced elsewhere), the lowest index leads.
pub fn fill_rendezvous<'a>(placed: &mut [Allocation], live: &[&Allocation], size: u32, node_of: impl Fn(&str) -> Option<&'a Node>) {
    let leader = placed.iter().chain(live.iter().copied()).min_by_key(|a| (a.index, a.id.clone()));
    let Some(leader) = leader else { return };
    let leader_ip = node_of(&leader.node_id).map(node_address).unwrap_or_default();
    let leader_port = leader.resources.as_ref().and_then(|r| r.ports.first()).map_or(DEFAULT_RENDEZVOUS_PORT, |p| p.host_port);
    let rv = GangRendezvous {
        rank: 0,
        size,
        leader_ip,
        leader_port,
        leader_alloc_id: leader.id.clone(),
        leader_node_id: leader.node_id.clone(),
    };
    for a in placed.iter_mut() {
        a.rendezvous = Some(GangRendezvous { rank: a.index, ..rv.clone() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(label: &str, static_port: u32, to: u32) -> PortSpec {
        PortSpec { label: label.into(), static_port, to }
    }

    #[test]
    fn static_ports_are_kept_and_dynamic_ones_take_the_lowest_free() {
        let cap = NodeResources { min_dynamic_port: 20_000, max_dynamic_port: 20_010, ..Default::default() };
        let mut usage = Usage::default();
        usage.ports.extend([20_000, 20_002]);
        let got = assign(&cap, &[spec("http", 0, 8080), spec("admin", 9000, 9000), spec("metrics", 0, 0)], &mut usage);
        let got: Vec<_> = got.iter().map(|p| (p.label.as_str(), p.host_port, p.to)).collect();
        assert_eq!(got, [("http", 20_001, 8080), ("admin", 9000, 9000), ("metrics", 20_003, 20_003)]);
        assert_eq!((usage.port_conflicts, usage.port_shortfall), (0, 0));
        assert!(usage.ports.contains(&9000) && usage.ports.contains(&20_003));
    }

    #[test]
    fn a_held_static_port_is_a_conflict_and_an_exhausted_range_a_shortfall() {
        let cap = NodeResources { min_dynamic_port: 30_000, max_dynamic_port: 30_001, ..Default::default() };
        let mut usage = Usage::default();
        usage.ports.insert(9000);
        assign(&cap, &[spec("a", 9000, 0), spec("b", 0, 0), spec("c", 0, 0), spec("d", 0, 0)], &mut usage);
        assert_eq!((usage.port_conflicts, usage.port_shortfall), (1, 1));
    }

    #[test]
    fn a_node_without_a_range_uses_the_default() {
        assert_eq!(dynamic_range(&NodeResources::default()), DEFAULT_DYNAMIC_PORTS);
        let bad = NodeResources { min_dynamic_port: 5, max_dynamic_port: 4, ..Default::default() };
        assert_eq!(dynamic_range(&bad), DEFAULT_DYNAMIC_PORTS);
    }

    #[test]
    fn node_addresses_drop_the_port() {
        let node = |a: &str| Node { rpc_addr: a.into(), ..Default::default() };
        assert_eq!(node_address(&node("10.1.2.3:4648")), "10.1.2.3");
        assert_eq!(node_address(&node("[::1]:4648")), "::1");
        assert_eq!(node_address(&node("host.example:1")), "host.example");
    }
}
