//! The node's end of the cluster overlay (issue 13 §2): one VXLAN device routing to the other
//! nodes' allocation subnets, as flannel's `vxlan` backend does, programmed over netlink.
//!
//! Every node holds a subnet leased by the servers; its bridge has the subnet's first host. The
//! VXLAN device (`<bridge>vx`, learning off, GBP on) carries the subnet's network address as a
//! /32 and a MAC derived from the subnet ([`vtep_mac`]), so no node needs to announce its MAC.
//! For each peer (another node with a subnet and an underlay address, from the servers'
//! `WatchOverlay` stream) the agent writes three kernel entries on the device:
//!
//! ```text
//! route  PEER_SUBNET via PEER_SUBNET.0 dev mlp0vx onlink    # allocations there are one hop away
//! neigh  PEER_SUBNET.0 lladdr vtep_mac(PEER_SUBNET)         # the peer's VTEP, never ARPed for
//! fdb    vtep_mac(PEER_SUBNET) dst PEER_UNDERLAY_ADDR self  # where to send its frames
//! ```
//!
//! so an allocation on node A reaches an allocation on node B by its own address, encapsulated
//! in UDP between the nodes' underlay addresses, with no NAT. Programming is idempotent
//! (`replace`) and converges: entries on the device that name no current peer are deleted, so a
//! node that leaves, goes down or comes back is reflected by the next set the servers send. The
//! device is created only once the node's bridge exists and it has at least one peer (a lone
//! node, or several test agents on one host, need none); it stays when the peers go away.
//!
//! GBP (VXLAN's group policy extension) carries the sender's packet mark across nodes, which is
//! how allocations of different namespaces are kept apart (`nft.rs`, the `bridge` table).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkVxlan, RouteMessageBuilder};

use super::links::{self, connect, find, is_errno, netlink};
use super::{NetworkError, NetworkSettings, Subnet};

/// Another node of the overlay.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    /// Its node id (for logs).
    pub node_id: String,
    /// Its allocation subnet.
    pub subnet: Subnet,
    /// Its underlay address.
    pub vtep: Ipv4Addr,
}

impl Peer {
    /// A peer from the servers' message; `None` (logged) when it does not parse.
    pub fn from_proto(p: &mlp_proto::v1::OverlayPeer) -> Option<Peer> {
        let subnet = Subnet::parse(&p.subnet).ok();
        let vtep = p.vtep_addr.parse().ok();
        match (subnet, vtep) {
            (Some(subnet), Some(vtep)) => Some(Peer { node_id: p.node_id.clone(), subnet, vtep }),
            _ => {
                tracing::warn!(node = %p.node_id, subnet = %p.subnet, vtep = %p.vtep_addr, "ignoring an overlay peer that does not parse");
                None
            }
        }
    }
}

/// The VTEP MAC of the node holding `subnet`: locally administered, unicast, and the subnet's
/// network address in its last four bytes.
pub fn vtep_mac(subnet: &Subnet) -> [u8; 6] {
    let o = subnet.network.octets();
    [0x0a, 0x6d, o[0], o[1], o[2], o[3]]
}

/// What the servers last sent, and whether the device was made.
#[derive(Debug, Default)]
pub struct OverlayState {
    /// The peers to program.
    pub desired: Vec<Peer>,
    /// The peers programmed by the last successful [`OverlayState::sync`].
    pub programmed: Vec<Peer>,
}

impl OverlayState {
    /// Brings the kernel to `desired`: creates the device when there is a peer to reach, then
    /// adds or replaces every peer's entries and deletes the device's other entries.
    pub async fn sync(&mut self, settings: &NetworkSettings) -> Result<(), NetworkError> {
        let own = settings.subnet;
        let local = settings.vtep_addr;
        let mut peers: Vec<Peer> =
            self.desired.iter().filter(|p| p.subnet != own && Some(p.vtep) != local && !p.vtep.is_loopback()).cloned().collect();
        peers.sort();
        peers.dedup();
        let handle = connect()?;
        let name = settings.vxlan();
        let index = match find(&handle, &name).await? {
            Some(link) => link.header.index,
            None if peers.is_empty() => {
                self.programmed.clear();
                return Ok(());
            }
            None => {
                let Some(local) = local else {
                    return Err(NetworkError::Setting(
                        "the overlay needs this node's underlay address (--network-vtep-addr, or a non-loopback --advertise)".into(),
                    ));
                };
                create_device(settings, local).await?
            }
        };
        for p in &peers {
            let mac = vtep_mac(&p.subnet);
            let gw = IpAddr::V4(p.subnet.network);
            handle
                .neighbours()
                .add(index, gw)
                .link_layer_address(&mac)
                .replace()
                .execute()
                .await
                .map_err(netlink(format!("adding the VTEP neighbour of {}", p.subnet)))?;
            handle
                .neighbours()
                .add_bridge(index, &mac)
                .destination(IpAddr::V4(p.vtep))
                .flags(NeighbourFlags::Own)
                .replace()
                .execute()
                .await
                .map_err(netlink(format!("adding the forwarding entry of {} to {}", p.subnet, p.vtep)))?;
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(p.subnet.network, p.subnet.prefix)
                .gateway(p.subnet.network)
                .output_interface(index)
                .onlink()
                .build();
            handle.route().add(route).replace().execute().await.map_err(netlink(format!("adding the route to {}", p.subnet)))?;
        }
        remove_others(&handle, index, &peers).await?;
        if peers != self.programmed {
            tracing::info!(
                peers = peers.len(),
                subnets = %peers.iter().map(|p| format!("{}@{}", p.subnet, p.vtep)).collect::<Vec<_>>().join(","),
                "overlay programmed"
            );
        }
        self.programmed = peers;
        Ok(())
    }
}

async fn create_device(settings: &NetworkSettings, local: Ipv4Addr) -> Result<u32, NetworkError> {
    let handle = connect()?;
    let name = settings.vxlan();
    let link = LinkVxlan::new(&name, settings.vni)
        .port(settings.vxlan_port)
        .local(local)
        .learning(false)
        .gbp()
        .mtu(settings.mtu)
        .address(vtep_mac(&settings.subnet).to_vec())
        .up()
        .build();
    match handle.link().add(link).execute().await {
        Err(e) if !is_errno(&e, libc::EEXIST) => {
            return Err(NetworkError::Netlink {
                what: format!("creating the VXLAN device {name} (vni {}, port {})", settings.vni, settings.vxlan_port),
                source: e,
            })
        }
        _ => {
            tracing::info!(device = %name, vni = settings.vni, port = settings.vxlan_port, local = %local, "created the overlay's VXLAN device")
        }
    }
    let index = links::index_of(&handle, &name).await?;
    let own = IpAddr::V4(settings.subnet.network);
    match handle.address().add(index, own, 32).execute().await {
        Err(e) if !is_errno(&e, libc::EEXIST) => {
            return Err(NetworkError::Netlink { what: format!("adding {own}/32 to {name}"), source: e })
        }
        _ => {}
    }
    Ok(index)
}

/// Deletes the device's routes, neighbours and forwarding entries that name none of `peers`.
async fn remove_others(handle: &rtnetlink::Handle, index: u32, peers: &[Peer]) -> Result<(), NetworkError> {
    let subnets: BTreeSet<(Ipv4Addr, u8)> = peers.iter().map(|p| (p.subnet.network, p.subnet.prefix)).collect();
    let gateways: BTreeSet<Ipv4Addr> = peers.iter().map(|p| p.subnet.network).collect();
    let macs: BTreeSet<[u8; 6]> = peers.iter().map(|p| vtep_mac(&p.subnet)).collect();

    let routes: Vec<_> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing routes"))?;
    for r in routes {
        let on_device = r.attributes.iter().any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index));
        if !on_device || r.header.table != RouteHeader::RT_TABLE_MAIN {
            continue;
        }
        let dst = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        });
        // The device's own routes (its /32's local and broadcast entries) live in other tables
        // or have no gateway; only gatewayed routes are ours.
        let gatewayed = r.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(_)));
        match dst {
            Some(ip) if gatewayed && !subnets.contains(&(ip, r.header.destination_prefix_length)) => {
                tracing::info!(route = %format!("{ip}/{}", r.header.destination_prefix_length), "removing the overlay route of a peer that is gone");
                if let Err(e) = handle.route().del(r).execute().await {
                    if !is_errno(&e, libc::ESRCH) {
                        return Err(NetworkError::Netlink { what: "deleting an overlay route".into(), source: e });
                    }
                }
            }
            _ => {}
        }
    }

    let neighbours: Vec<_> = handle.neighbours().get().execute().try_collect().await.map_err(netlink("listing neighbours"))?;
    for n in neighbours.into_iter().filter(|n| n.header.ifindex == index && n.header.family == AddressFamily::Inet) {
        let dst = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
            _ => None,
        });
        if dst.is_some_and(|ip| !gateways.contains(&ip)) {
            if let Err(e) = handle.neighbours().del(n).execute().await {
                if !is_errno(&e, libc::ENOENT) {
                    return Err(NetworkError::Netlink { what: "deleting an overlay neighbour".into(), source: e });
                }
            }
        }
    }

    let fdb: Vec<_> = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing forwarding entries"))?;
    for n in fdb.into_iter().filter(|n| n.header.ifindex == index) {
        let mac = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(m) if m.len() == 6 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(m);
                Some(mac)
            }
            _ => None,
        });
        // Only the entries with a remote destination are ours (the device's own are not).
        let remote = n.attributes.iter().any(|a| matches!(a, NeighbourAttribute::Destination(_)));
        if remote && mac.is_some_and(|m| !macs.contains(&m)) {
            if let Err(e) = handle.neighbours().del(n).execute().await {
                if !is_errno(&e, libc::ENOENT) {
                    return Err(NetworkError::Netlink { what: "deleting an overlay forwarding entry".into(), source: e });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_macs_are_local_unicast_and_follow_the_subnet() -> Result<(), NetworkError> {
        let a = vtep_mac(&Subnet::parse("172.26.3.0/24")?);
        assert_eq!(a, [0x0a, 0x6d, 172, 26, 3, 0]);
        assert_eq!(a[0] & 0b10, 0b10, "locally administered");
        assert_eq!(a[0] & 0b01, 0, "unicast");
        assert_ne!(a, vtep_mac(&Subnet::parse("172.26.4.0/24")?));
        Ok(())
    }

    #[test]
    fn peers_parse_or_are_dropped() {
        let ok = mlp_proto::v1::OverlayPeer {
            node_id: "n".into(),
            node_name: "n".into(),
            subnet: "10.1.2.0/24".into(),
            vtep_addr: "198.18.0.2".into(),
        };
        assert_eq!(Peer::from_proto(&ok).map(|p| p.vtep), Some(Ipv4Addr::new(198, 18, 0, 2)));
        let bad = mlp_proto::v1::OverlayPeer { vtep_addr: "nowhere".into(), ..ok };
        assert!(Peer::from_proto(&bad).is_none());
    }
}
