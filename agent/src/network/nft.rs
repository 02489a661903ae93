//! The one nftables table the agent owns (`table ip mlp`; `mlp_<bridge>` for another bridge).
//!
//! Why the `nftables` crate (JSON to the `nft` binary) and not netlink: nftables' netlink
//! protocol is a bytecode of expressions that the Rust netlink crates do not model (rustables is
//! young and unmaintained for our kernel range; `nftnl` needs libnftnl); `nft`'s JSON API is
//! the stable, documented interface, the crate is maintained and types every object, and one
//! `nft -j -f -` call is one atomic transaction. The cost is one `nft` process per change
//! (about 2-4 ms, measured in docs/benchmarks.md).
//!
//! The base chains are fixed; allocations only add and remove rules of the regular chain
//! `ports`, each carrying its allocation's id as its comment:
//!
//! ```text
//! chain ports       { tcp dport 20001 dnat to 172.26.64.2:8080 comment "<alloc id>"; udp dport 20001 ... }
//! chain prerouting  { type nat hook prerouting priority dstnat; fib daddr type local jump ports }
//! chain output      { type nat hook output priority -100;       fib daddr type local jump ports }
//! chain postrouting { type nat hook postrouting priority srcnat;
//!   ip saddr SUBNET oifname != BRIDGE masquerade                  # egress
//!   oifname BRIDGE ip saddr 127.0.0.0/8 masquerade                # 127.0.0.1:<host port> from the node
//!   oifname BRIDGE ip saddr SUBNET ct status dnat masquerade }    # hairpin: allocation → node:<host port> → allocation
//! ```
//!
//! (A `dnat ip to meta l4proto . th dport map @ports` with one map would be O(1) per packet,
//! but nft 1.0.6, Debian 12's, crashes on concatenated map data given as JSON.) Removing an
//! allocation's mappings deletes exactly the rules with its comment, by handle, in one
//! transaction; the base chains never change while allocations come and go.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use nftables::schema::Nftables;
use serde_json::{json, Value};

use super::{AllocNetwork, NetworkError, NetworkSettings};

const PORTS: &str = "ports";
const PROTOCOLS: [&str; 2] = ["tcp", "udp"];

fn nft_error(what: &str) -> impl FnOnce(nftables::helper::NftablesError) -> NetworkError + '_ {
    move |e| {
        let message = match &e {
            nftables::helper::NftablesError::NftFailed { stderr, stdout, .. } => format!("{e}: {} {}", stderr.trim(), stdout.trim()),
            _ => e.to_string(),
        };
        NetworkError::Nft { what: what.to_string(), message }
    }
}

/// Applies one transaction given as nft JSON commands (checked against the crate's schema).
fn apply(what: &str, commands: Vec<Value>) -> Result<(), NetworkError> {
    let doc: Nftables<'static> = serde_json::from_value(json!({ "nftables": commands }))
        .map_err(|e| NetworkError::Nft { what: what.to_string(), message: format!("building the request: {e}") })?;
    nftables::helper::apply_ruleset(&doc).map_err(nft_error(what))
}

fn prefix(addr: Ipv4Addr, len: u8) -> Value {
    json!({ "prefix": { "addr": addr.to_string(), "len": len } })
}

fn field(protocol: &str, name: &str) -> Value {
    json!({ "payload": { "protocol": protocol, "field": name } })
}

fn eq(left: Value, right: Value) -> Value {
    json!({ "match": { "op": "==", "left": left, "right": right } })
}

/// Creates the table (map, chains, rules) or brings an existing one back to these rules,
/// keeping the map's elements: one transaction.
pub fn ensure_table(settings: &NetworkSettings) -> Result<(), NetworkError> {
    let t = settings.table();
    let bridge = settings.bridge.as_str();
    let subnet = prefix(settings.subnet.network, settings.subnet.prefix);
    let dnat = json!([eq(json!({ "fib": { "result": "type", "flags": ["daddr"] } }), json!("local")), { "jump": { "target": PORTS } }]);
    let oif = |op: &str| json!({ "match": { "op": op, "left": { "meta": { "key": "oifname" } }, "right": bridge } });
    let saddr = |p: Value| eq(field("ip", "saddr"), p);
    let masquerade = json!({ "masquerade": null });
    let rules = [
        ("prerouting", dnat.clone()),
        ("output", dnat),
        ("postrouting", json!([saddr(subnet.clone()), oif("!="), masquerade])),
        ("postrouting", json!([oif("=="), saddr(prefix(Ipv4Addr::new(127, 0, 0, 0), 8)), masquerade])),
        (
            "postrouting",
            json!([oif("=="), saddr(subnet), { "match": { "op": "in", "left": { "ct": { "key": "status" } }, "right": "dnat" } }, masquerade]),
        ),
    ];
    let mut cmds = vec![
        json!({ "add": { "table": { "family": "ip", "name": t } } }),
        json!({ "add": { "chain": { "family": "ip", "table": t, "name": PORTS } } }),
    ];
    for (chain, hook, prio) in [("prerouting", "prerouting", -100), ("output", "output", -100), ("postrouting", "postrouting", 100)] {
        cmds.push(json!({ "add": { "chain": { "family": "ip", "table": t, "name": chain, "type": "nat", "hook": hook, "prio": prio, "policy": "accept" } } }));
        cmds.push(json!({ "flush": { "chain": { "family": "ip", "table": t, "name": chain } } }));
    }
    for (chain, expr) in rules {
        cmds.push(json!({ "add": { "rule": { "family": "ip", "table": t, "chain": chain, "expr": expr } } }));
    }
    apply("creating the table", cmds)
}

fn rule_cmd(verb: &str, settings: &NetworkSettings, rule: Value) -> Value {
    let mut body = json!({ "family": "ip", "table": settings.table(), "chain": PORTS });
    if let (Some(b), Some(r)) = (body.as_object_mut(), rule.as_object()) {
        b.extend(r.clone());
    }
    json!({ verb: { "rule": body } })
}

/// Maps `net`'s host ports to it (TCP and UDP).
pub fn add_ports(settings: &NetworkSettings, net: &AllocNetwork) -> Result<(), NetworkError> {
    let mut cmds = Vec::new();
    for p in &net.ports {
        for proto in PROTOCOLS {
            let expr = json!([eq(field(proto, "dport"), json!(p.host_port)), { "dnat": { "family": "ip", "addr": net.ip.to_string(), "port": p.to } }]);
            cmds.push(rule_cmd("add", settings, json!({ "comment": net.alloc_id, "expr": expr })));
        }
    }
    apply("adding port mappings", cmds)
}

fn delete(settings: &NetworkSettings, what: &str, handles: Vec<u64>) -> Result<(), NetworkError> {
    if handles.is_empty() {
        return Ok(());
    }
    apply(what, handles.into_iter().map(|h| rule_cmd("delete", settings, json!({ "handle": h, "expr": [] }))).collect())
}

/// Removes `net`'s port mappings (those still there).
pub fn remove_ports(settings: &NetworkSettings, net: &AllocNetwork) -> Result<(), NetworkError> {
    let mine = mapped(settings)?.into_iter().filter(|m| m.alloc_id == net.alloc_id || m.ip == net.ip).map(|m| m.handle).collect();
    delete(settings, "removing port mappings", mine)
}

/// Removes every mapping to an address not in `keep` (agent start).
pub fn remove_ports_except(settings: &NetworkSettings, keep: &BTreeSet<Ipv4Addr>) -> Result<(), NetworkError> {
    let gone: Vec<u64> = mapped(settings)?.into_iter().filter(|m| !keep.contains(&m.ip)).map(|m| m.handle).collect();
    if !gone.is_empty() {
        tracing::info!(rules = gone.len(), "removing leftover port mappings");
    }
    delete(settings, "removing leftover port mappings", gone)
}

/// One port-mapping rule, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// The rule's handle.
    pub handle: u64,
    /// Its comment: the allocation's id.
    pub alloc_id: String,
    /// The address it translates to.
    pub ip: Ipv4Addr,
    /// "tcp dport 20001 -> 172.26.64.2:8080", for messages.
    pub text: String,
}

impl std::fmt::Display for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.text, self.alloc_id)
    }
}

/// The port-mapping rules; none when the table does not exist.
pub fn mapped(settings: &NetworkSettings) -> Result<Vec<Mapping>, NetworkError> {
    let t = settings.table();
    let raw =
        match nftables::helper::get_current_ruleset_raw(nftables::helper::DEFAULT_NFT, ["-j", "list", "chain", "ip", t.as_str(), PORTS]) {
            Ok(raw) => raw,
            Err(nftables::helper::NftablesError::NftFailed { stderr, .. }) if stderr.contains("No such file or directory") => {
                return Ok(Vec::new())
            }
            Err(e) => return Err(nft_error("listing port mappings")(e)),
        };
    let doc: Value =
        serde_json::from_str(&raw).map_err(|e| NetworkError::Nft { what: "listing port mappings".into(), message: e.to_string() })?;
    let mut out = Vec::new();
    for rule in doc["nftables"].as_array().into_iter().flatten().map(|o| &o["rule"]).filter(|r| r.is_object()) {
        let Some(handle) = rule["handle"].as_u64() else { continue };
        let exprs = rule["expr"].as_array().cloned().unwrap_or_default();
        let dnat = exprs.iter().find_map(|e| e.get("dnat")).cloned().unwrap_or_default();
        let ip = dnat["addr"].as_str().and_then(|s| s.parse().ok()).unwrap_or(Ipv4Addr::UNSPECIFIED);
        let matched = exprs.iter().find_map(|e| e.get("match")).cloned().unwrap_or_default();
        let text = format!("{} dport {} -> {ip}:{}", matched["left"]["payload"]["protocol"], matched["right"], dnat["port"]);
        out.push(Mapping { handle, alloc_id: rule["comment"].as_str().unwrap_or_default().to_string(), ip, text });
    }
    Ok(out)
}
