//! The agent's DNS responder (issue 13 §3): the resolver of every bridge-mode task, listening
//! on the bridge's gateway address, port 53, UDP and TCP.
//!
//! * `NAME.service.mlp` (namespace `default`) and `NAME.NAMESPACE.service.mlp`: A records of the
//!   passing instances of the service (cluster-wide, from the servers' `WatchServices` stream),
//!   SRV records (also for `_NAME._tcp.service.mlp`) with their ports, whose targets
//!   `A-B-C-D.addr.service.mlp` resolve to the instance's address (and come along as additional
//!   records). TTL 0: an instance that stops passing is gone from the next answer.
//! * Every other name is forwarded, as the same bytes, over UDP to the host's resolvers (or the
//!   agent's `--dns-upstream`), one after the other; when none answers the client gets SERVFAIL.
//!
//! Messages are parsed and built with `hickory-proto` (the Hickory DNS project's wire format
//! library); the serving loop is ours (a few lines: one zone, no caching, raw forwarding),
//! which keeps `hickory-server`'s catalog and authority machinery out of the agent.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use mlp_proto::v1::ServiceRegistration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// The zone the responder answers itself.
pub const ZONE: &str = "service.mlp";
/// How long one upstream resolver gets to answer a forwarded query.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Answers carry at most this many instances (a UDP answer stays well under 512 bytes... for
/// small sets; larger sets are cut to this many).
pub const MAX_ANSWERS: usize = 32;

/// Errors starting the responder.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Passing instances by (namespace, service name): what the responder answers from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DnsTable {
    services: BTreeMap<(String, String), Vec<(Ipv4Addr, u16)>>,
}

impl DnsTable {
    /// The table of a set of registrations (the passing ones with an IPv4 address).
    pub fn from_instances(instances: &[ServiceRegistration]) -> DnsTable {
        let mut services: BTreeMap<(String, String), Vec<(Ipv4Addr, u16)>> = BTreeMap::new();
        for r in instances {
            if r.health != mlp_proto::consts::service_health::PASSING {
                continue;
            }
            let Ok(ip) = r.address.parse::<Ipv4Addr>() else { continue };
            let port = u16::try_from(r.port).unwrap_or(0);
            let e = services.entry((r.namespace.clone(), r.service_name.clone())).or_default();
            if !e.contains(&(ip, port)) {
                e.push((ip, port));
            }
        }
        DnsTable { services }
    }

    fn instances(&self, namespace: &str, name: &str) -> Option<&[(Ipv4Addr, u16)]> {
        self.services.get(&(namespace.to_string(), name.to_string())).map(Vec::as_slice)
    }
}

/// What a query asks of our zone.
#[derive(Debug, PartialEq, Eq)]
enum Lookup {
    /// `NAME[.NAMESPACE].service.mlp` or `_NAME._tcp[.NAMESPACE].service.mlp`.
    Service { namespace: String, name: String },
    /// `A-B-C-D.addr.service.mlp`.
    Addr(Ipv4Addr),
    /// `service.mlp` itself or a name under it that means nothing.
    Nothing,
}

/// The labels of `name` below the zone, lowercased, when it is in the zone.
fn zone_labels(name: &Name) -> Option<Vec<String>> {
    let labels: Vec<String> = name.iter().map(|l| String::from_utf8_lossy(l).to_ascii_lowercase()).collect();
    let n = labels.len();
    if n < 2 || labels[n - 2] != "service" || labels[n - 1] != "mlp" {
        return None;
    }
    Some(labels[..n - 2].to_vec())
}

fn lookup(labels: &[String]) -> Lookup {
    match labels {
        [name] if !name.starts_with('_') => Lookup::Service { namespace: "default".into(), name: name.clone() },
        [addr, kind] if kind == "addr" => addr.replace('-', ".").parse().map(Lookup::Addr).unwrap_or(Lookup::Nothing),
        [name, ns] if !name.starts_with('_') => Lookup::Service { namespace: ns.clone(), name: name.clone() },
        [name, proto] if proto == "_tcp" => match name.strip_prefix('_') {
            Some(n) => Lookup::Service { namespace: "default".into(), name: n.to_string() },
            None => Lookup::Nothing,
        },
        [name, proto, ns] if proto == "_tcp" => match name.strip_prefix('_') {
            Some(n) => Lookup::Service { namespace: ns.clone(), name: n.to_string() },
            None => Lookup::Nothing,
        },
        _ => Lookup::Nothing,
    }
}

fn addr_name(ip: Ipv4Addr) -> Option<Name> {
    let o = ip.octets();
    Name::from_ascii(format!("{}-{}-{}-{}.addr.{ZONE}.", o[0], o[1], o[2], o[3])).ok()
}

/// The answer to a query in our zone, or `None` when the query is not ours (forward it).
pub fn answer(query: &Message, table: &DnsTable) -> Option<Message> {
    let q = query.queries().first()?;
    let labels = zone_labels(q.name())?;
    let mut resp = Message::new();
    resp.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true)
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .add_query(q.clone());
    let qtype = q.query_type();
    let name = q.name().clone();
    match lookup(&labels) {
        Lookup::Service { namespace, name: svc } => match table.instances(&namespace, &svc) {
            Some(list) if !list.is_empty() => {
                for &(ip, port) in list.iter().take(MAX_ANSWERS) {
                    match qtype {
                        RecordType::A | RecordType::ANY => {
                            resp.add_answer(Record::from_rdata(name.clone(), 0, RData::A(A(ip))));
                        }
                        RecordType::SRV => {
                            let Some(target) = addr_name(ip) else { continue };
                            resp.add_answer(Record::from_rdata(name.clone(), 0, RData::SRV(SRV::new(1, 1, port, target.clone()))));
                            resp.add_additional(Record::from_rdata(target, 0, RData::A(A(ip))));
                        }
                        _ => {} // the name exists; no records of this type (NODATA)
                    }
                }
            }
            _ => {
                resp.set_response_code(ResponseCode::NXDomain);
            }
        },
        Lookup::Addr(ip) => {
            if matches!(qtype, RecordType::A | RecordType::ANY) {
                resp.add_answer(Record::from_rdata(name, 0, RData::A(A(ip))));
            }
        }
        Lookup::Nothing => {
            if !labels.is_empty() {
                resp.set_response_code(ResponseCode::NXDomain);
            }
        }
    }
    Some(resp)
}

/// A SERVFAIL answer to `query` (`raw` when it did not even parse: then only its id is kept).
fn servfail(query: Option<&Message>, raw: &[u8]) -> Vec<u8> {
    let mut resp = Message::new();
    let id = query.map(|q| q.id()).unwrap_or_else(|| if raw.len() >= 2 { u16::from_be_bytes([raw[0], raw[1]]) } else { 0 });
    resp.set_id(id).set_message_type(MessageType::Response).set_response_code(ResponseCode::ServFail);
    if let Some(q) = query {
        resp.set_op_code(q.op_code()).set_recursion_desired(q.recursion_desired());
        for qq in q.queries() {
            resp.add_query(qq.clone());
        }
    }
    resp.to_vec().unwrap_or_default()
}

/// The name servers of a resolv.conf (port 53).
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ns| ns.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The responder's shared parts.
pub struct Responder {
    pub table: watch::Receiver<Arc<DnsTable>>,
    pub upstreams: Vec<SocketAddr>,
}

impl Responder {
    /// The answer to one raw query: ours, forwarded, or SERVFAIL.
    pub async fn handle(&self, raw: &[u8]) -> Vec<u8> {
        let Ok(query) = Message::from_vec(raw) else { return servfail(None, raw) };
        if query.message_type() != MessageType::Query || query.op_code() != OpCode::Query {
            return servfail(Some(&query), raw);
        }
        let table = self.table.borrow().clone();
        if let Some(resp) = answer(&query, &table) {
            return resp.to_vec().unwrap_or_else(|_| servfail(Some(&query), raw));
        }
        for up in &self.upstreams {
            match forward(*up, raw).await {
                Ok(resp) => return resp,
                Err(e) => tracing::debug!(upstream = %up, error = %e, "forwarding a DNS query failed"),
            }
        }
        servfail(Some(&query), raw)
    }
}

/// Sends `raw` to `upstream` over UDP and returns the answer with the same id.
async fn forward(upstream: SocketAddr, raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().map_err(std::io::Error::other)?;
    let sock = tokio::net::UdpSocket::bind(bind).await?;
    sock.connect(upstream).await?;
    sock.send(raw).await?;
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + FORWARD_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
        if n >= 2 && raw.len() >= 2 && buf[..2] == raw[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

/// A socket bound to `addr` even before the address exists (`IP_FREEBIND`): the bridge and its
/// gateway address appear with the first bridge-mode allocation, the responder is there first.
fn freebind_socket(kind: nix::sys::socket::SockType, addr: SocketAddr) -> Result<std::os::fd::OwnedFd, DnsError> {
    use nix::sys::socket::{bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockaddrStorage};
    let io = |what: &str| {
        let what = format!("{what} for the DNS responder on {addr}");
        move |e: nix::errno::Errno| DnsError::Io { what, source: std::io::Error::from(e) }
    };
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, kind, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None).map_err(io("creating a socket"))?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(io("setting SO_REUSEADDR"))?;
    setsockopt(&fd, sockopt::IpFreebind, &true).map_err(io("setting IP_FREEBIND"))?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrStorage::from(addr)).map_err(io("binding"))?;
    Ok(fd)
}

/// Serves DNS on `addr` (UDP and TCP) until the task is dropped.
pub async fn serve(addr: SocketAddr, responder: Arc<Responder>) -> Result<(), DnsError> {
    use nix::sys::socket::SockType;
    let udp = std::net::UdpSocket::from(freebind_socket(SockType::Datagram, addr)?);
    let udp =
        Arc::new(tokio::net::UdpSocket::from_std(udp).map_err(|source| DnsError::Io { what: format!("registering UDP {addr}"), source })?);
    let tcp_fd = freebind_socket(SockType::Stream, addr)?;
    nix::sys::socket::listen(&tcp_fd, nix::sys::socket::Backlog::new(128).unwrap_or(nix::sys::socket::Backlog::MAXCONN))
        .map_err(|e| DnsError::Io { what: format!("listening on TCP {addr}"), source: e.into() })?;
    let tcp = tokio::net::TcpListener::from_std(std::net::TcpListener::from(tcp_fd))
        .map_err(|source| DnsError::Io { what: format!("registering TCP {addr}"), source })?;
    tracing::info!(%addr, "DNS responder listening");
    let r = responder.clone();
    let tcp_task = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = tcp.accept().await else {
                // Out of descriptors or the like: let it pass rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let r = r.clone();
            tokio::spawn(async move {
                // Length-prefixed messages until the client closes (or idles 10 s).
                loop {
                    let mut len = [0u8; 2];
                    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut len)).await;
                    if !matches!(read, Ok(Ok(_))) {
                        return;
                    }
                    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if conn.read_exact(&mut msg).await.is_err() {
                        return;
                    }
                    let resp = r.handle(&msg).await;
                    let Ok(n) = u16::try_from(resp.len()) else { return };
                    if conn.write_all(&n.to_be_bytes()).await.is_err() || conn.write_all(&resp).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let _guard = AbortOnDrop(tcp_task);
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = match udp.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "DNS receive failed");
                continue;
            }
        };
        let msg = buf[..n].to_vec();
        let (r, udp) = (responder.clone(), udp.clone());
        tokio::spawn(async move {
            let mut resp = r.handle(&msg).await;
            if resp.len() > 512 {
                // Too big for plain UDP: the client retries over TCP.
                if let Ok(m) = Message::from_vec(&resp) {
                    let mut t = Message::new();
                    t.set_id(m.id()).set_message_type(MessageType::Response).set_truncated(true).set_response_code(m.response_code());
                    for q in m.queries() {
                        t.add_query(q.clone());
                    }
                    resp = t.to_vec().unwrap_or(resp);
                }
            }
            let _ = udp.send_to(&resp, peer).await;
        });
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn reg(ns: &str, name: &str, ip: &str, port: u32, health: &str) -> ServiceRegistration {
        ServiceRegistration {
            namespace: ns.into(),
            service_name: name.into(),
            address: ip.into(),
            port,
            health: health.into(),
            ..Default::default()
        }
    }

    fn query(name: &str, t: RecordType) -> Message {
        let mut m = Message::new();
        m.set_id(7).set_recursion_desired(true).add_query(Query::query(Name::from_ascii(name).expect("name"), t));
        m
    }

    fn table() -> DnsTable {
        DnsTable::from_instances(&[
            reg("default", "web", "10.1.0.2", 8080, "passing"),
            reg("default", "web", "10.1.0.3", 8081, "passing"),
            reg("default", "web", "10.1.0.4", 8082, "critical"),
            reg("team-a", "web", "10.2.0.2", 80, "passing"),
        ])
    }

    fn a_records(m: &Message) -> Vec<Ipv4Addr> {
        m.answers().iter().filter_map(|r| r.data().and_then(|d| d.as_a()).map(|a| a.0)).collect()
    }

    #[test]
    fn a_records_are_the_passing_instances() {
        let m = answer(&query("web.service.mlp.", RecordType::A), &table()).expect("ours");
        assert_eq!((m.id(), m.response_code()), (7, ResponseCode::NoError));
        assert_eq!(a_records(&m), vec![Ipv4Addr::new(10, 1, 0, 2), Ipv4Addr::new(10, 1, 0, 3)]);
        let upper = answer(&query("WEB.Service.MLP.", RecordType::A), &table()).expect("ours");
        assert_eq!(a_records(&upper).len(), 2, "names are case-insensitive");
        let ns = answer(&query("web.team-a.service.mlp.", RecordType::A), &table()).expect("ours");
        assert_eq!(a_records(&ns), vec![Ipv4Addr::new(10, 2, 0, 2)]);
    }

    #[test]
    fn srv_records_carry_ports_and_resolvable_targets() {
        for name in ["web.service.mlp.", "_web._tcp.service.mlp."] {
            let m = answer(&query(name, RecordType::SRV), &table()).expect("ours");
            let srv: Vec<(u16, String)> =
                m.answers().iter().filter_map(|r| r.data().and_then(|d| d.as_srv()).map(|s| (s.port(), s.target().to_ascii()))).collect();
            assert_eq!(srv, vec![(8080, "10-1-0-2.addr.service.mlp.".to_string()), (8081, "10-1-0-3.addr.service.mlp.".to_string())]);
            assert_eq!(m.additionals().len(), 2);
        }
        let t = answer(&query("10-1-0-2.addr.service.mlp.", RecordType::A), &table()).expect("ours");
        assert_eq!(a_records(&t), vec![Ipv4Addr::new(10, 1, 0, 2)]);
    }

    #[test]
    fn unknown_or_unhealthy_names_are_nxdomain_and_other_zones_are_not_ours() {
        let critical_only = DnsTable::from_instances(&[reg("default", "db", "10.1.0.9", 5432, "critical")]);
        for (name, t) in [("db.service.mlp.", &critical_only), ("nope.service.mlp.", &table())] {
            let m = answer(&query(name, RecordType::A), t).expect("ours");
            assert_eq!(m.response_code(), ResponseCode::NXDomain, "{name}");
            assert!(m.answers().is_empty());
        }
        let aaaa = answer(&query("web.service.mlp.", RecordType::AAAA), &table()).expect("ours");
        assert_eq!((aaaa.response_code(), aaaa.answers().len()), (ResponseCode::NoError, 0), "NODATA for a name that exists");
        assert!(answer(&query("example.com.", RecordType::A), &table()).is_none());
        assert!(answer(&query("service.mlp.example.com.", RecordType::A), &table()).is_none());
    }

    #[test]
    fn resolv_conf_nameservers() {
        let ns = nameservers("# x\nnameserver 10.0.0.1\nsearch a\nnameserver ::1\nnameserver bogus\n");
        assert_eq!(ns, vec!["10.0.0.1:53".parse().expect("addr"), "[::1]:53".parse().expect("addr")]);
    }

    #[tokio::test]
    async fn other_names_are_forwarded_or_servfail() {
        // A fake upstream that answers every query with one A record.
        let up = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let up_addr = up.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = up.recv_from(&mut buf).await {
                let q = Message::from_vec(&buf[..n]).expect("query");
                let mut r = Message::new();
                r.set_id(q.id()).set_message_type(MessageType::Response).add_query(q.queries()[0].clone());
                r.add_answer(Record::from_rdata(q.queries()[0].name().clone(), 60, RData::A(A(Ipv4Addr::new(192, 0, 2, 7)))));
                let _ = up.send_to(&r.to_vec().expect("encode"), peer).await;
            }
        });
        let (_tx, rx) = watch::channel(Arc::new(table()));
        let responder = Responder { table: rx.clone(), upstreams: vec![up_addr] };
        let raw = query("example.com.", RecordType::A).to_vec().expect("encode");
        let resp = Message::from_vec(&responder.handle(&raw).await).expect("answer");
        assert_eq!((resp.id(), resp.response_code()), (7, ResponseCode::NoError));
        assert_eq!(a_records(&resp), vec![Ipv4Addr::new(192, 0, 2, 7)]);
        // An upstream that never answers: SERVFAIL, within the forward timeout.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let responder = Responder { table: rx, upstreams: vec![silent.local_addr().expect("addr")] };
        let resp = Message::from_vec(&responder.handle(&raw).await).expect("answer");
        assert_eq!((resp.id(), resp.response_code()), (7, ResponseCode::ServFail));
    }
}
