//! Links, addresses and routes over netlink (`rtnetlink`; never the `ip` binary): the node
//! bridge, an allocation's veth pair (the peer is created directly inside the allocation's
//! namespace as `eth0`), its address and default route.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::{netns, AllocNetwork, NetworkError, NetworkSettings};

pub(super) fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink { what, source }
}

pub(super) fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

/// A netlink connection in the calling thread's network namespace, driven on the current
/// runtime.
pub(super) fn connect() -> Result<Handle, NetworkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetworkError::io("opening a netlink socket"))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// The link called `name`, if there is one.
pub(super) async fn find(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, NetworkError> {
    match handle.link().get().match_name(name.to_string()).execute().try_next().await {
        Ok(found) => Ok(found),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(NetworkError::Netlink { what: format!("looking up link {name}"), source: e }),
    }
}

pub(super) async fn index_of(handle: &Handle, name: &str) -> Result<u32, NetworkError> {
    find(handle, name).await?.map(|l| l.header.index).ok_or_else(|| NetworkError::Io {
        what: format!("link {name}"),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such link"),
    })
}

/// Whether a link called `name` exists.
pub async fn exists(name: &str) -> Result<bool, NetworkError> {
    let handle = connect()?;
    Ok(find(&handle, name).await?.is_some())
}

/// Creates the node bridge with the subnet's first host as its address, unless it exists, and
/// brings it up.
pub async fn ensure_bridge(settings: &NetworkSettings) -> Result<(), NetworkError> {
    let handle = connect()?;
    let name = &settings.bridge;
    if find(&handle, name).await?.is_none() {
        let made = handle.link().add(LinkBridge::new(name).mtu(settings.mtu).up().build()).execute().await;
        match made {
            Err(e) if !is_errno(&e, libc::EEXIST) => {
                return Err(NetworkError::Netlink { what: format!("creating bridge {name}"), source: e })
            }
            _ => tracing::info!(bridge = %name, "created the node bridge"),
        }
    }
    let index = index_of(&handle, name).await?;
    let gateway = IpAddr::V4(settings.subnet.gateway());
    match handle.address().add(index, gateway, settings.subnet.prefix).execute().await {
        Err(e) if !is_errno(&e, libc::EEXIST) => {
            return Err(NetworkError::Netlink { what: format!("adding {gateway} to {name}"), source: e })
        }
        _ => {}
    }
    handle.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await.map_err(netlink(format!("bringing {name} up")))
}

/// Lets the node route for its allocations: IPv4 forwarding, and `route_localnet` on the
/// bridge so that locally generated traffic to 127.0.0.1:<host port> may leave, DNATed, through
/// it (it is then masqueraded to the bridge's address, see `nft`).
pub fn enable_forwarding(bridge: &str) -> Result<(), NetworkError> {
    for path in ["/proc/sys/net/ipv4/ip_forward".to_string(), format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet")] {
        std::fs::write(&path, "1").map_err(NetworkError::io(format!("writing 1 to {path}")))?;
    }
    Ok(())
}

/// Creates `net`'s namespace, its veth pair (host end on the bridge, `eth0` inside), its
/// address and default route. Runs on a thread of its own, which ends inside the namespace.
pub async fn create_alloc_links(settings: &NetworkSettings, net: &AllocNetwork) -> Result<(), NetworkError> {
    let (settings, net) = (settings.clone(), net.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("mlp-netns".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            let result = match runtime {
                Ok(rt) => rt.block_on(create_on_this_thread(&settings, &net)),
                Err(e) => Err(NetworkError::Io { what: "starting the namespace thread's runtime".into(), source: e }),
            };
            let _ = tx.send(result);
        })
        .map_err(NetworkError::io("spawning the namespace thread"))?;
    rx.await
        .map_err(|_| NetworkError::Io { what: "the namespace thread".into(), source: std::io::Error::other("ended without an answer") })?
}

async fn create_on_this_thread(settings: &NetworkSettings, net: &AllocNetwork) -> Result<(), NetworkError> {
    let host = connect()?;
    let bridge = index_of(&host, &settings.bridge).await?;
    // From here on this thread is inside the allocation's namespace; `host` stays outside.
    netns::create_on_this_thread(&net.netns)?;
    let inside = connect()?;
    let ns_file = std::fs::File::open(&net.netns).map_err(NetworkError::io(format!("opening {}", net.netns.display())))?;
    let peer = LinkUnspec::new_with_name("eth0").mtu(settings.mtu).setns_by_fd(std::os::fd::AsRawFd::as_raw_fd(&ns_file)).build();
    let veth = LinkVeth::new(&net.host_veth, "eth0")
        .mtu(settings.mtu)
        .controller(bridge)
        .up()
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    host.link().add(veth).execute().await.map_err(netlink(format!("creating veth {}", net.host_veth)))?;
    drop(ns_file);
    let lo = index_of(&inside, "lo").await?;
    inside.link().set(LinkUnspec::new_with_index(lo).up().build()).execute().await.map_err(netlink("bringing lo up"))?;
    let eth0 = index_of(&inside, "eth0").await?;
    inside.address().add(eth0, IpAddr::V4(net.ip), net.prefix).execute().await.map_err(netlink(format!("adding {} to eth0", net.ip)))?;
    inside.link().set(LinkUnspec::new_with_index(eth0).up().build()).execute().await.map_err(netlink("bringing eth0 up"))?;
    let default = RouteMessageBuilder::<Ipv4Addr>::new().gateway(net.gateway).output_interface(eth0).build();
    inside.route().add(default).execute().await.map_err(netlink(format!("adding the default route via {}", net.gateway)))
}

/// Deletes the link `name` (a veth's peer goes with it); a missing link is fine.
pub async fn delete_link(name: &str) -> Result<(), NetworkError> {
    let handle = connect()?;
    let Some(link) = find(&handle, name).await? else { return Ok(()) };
    match handle.link().del(link.header.index).execute().await {
        Err(e) if !is_errno(&e, libc::ENODEV) => Err(NetworkError::Netlink { what: format!("deleting {name}"), source: e }),
        _ => Ok(()),
    }
}

/// Names of the links enslaved to `bridge`.
pub async fn bridge_ports(bridge: &str) -> Result<Vec<String>, NetworkError> {
    let handle = connect()?;
    let index = index_of(&handle, bridge).await?;
    let links: Vec<LinkMessage> = handle.link().get().execute().try_collect().await.map_err(netlink("listing links"))?;
    Ok(links
        .into_iter()
        .filter(|l| l.attributes.iter().any(|a| matches!(a, LinkAttribute::Controller(c) if *c == index)))
        .filter_map(|l| {
            l.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n),
                _ => None,
            })
        })
        .collect())
}
