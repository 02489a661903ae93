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
//!   ip saddr SUBNET oifname != BRIDGE oifname != VXLAN masquerade # egress (not the overlay)
//!   oifname BRIDGE ip saddr 127.0.0.0/8 masquerade                # 127.0.0.1:<host port> from the node
//!   oifname BRIDGE ip saddr SUBNET ct status dnat masquerade }    # hairpin: allocation → node:<host port> → allocation
//! ```
//!
//! Namespaces are kept apart by a second table, `table bridge mlp` (same name), whose rules see
//! every frame entering and leaving an allocation's veth:
//!
//! ```text
//! chain tagging         { type filter hook prerouting priority -200;
//!   iifname VETH ip saddr != ALLOC_IP drop comment "<alloc id>"   # no spoofed sources
//!   iifname VETH meta mark set TAG comment "<alloc id>" }         # TAG: its namespace's
//! chain isolate_forward { type filter hook forward priority 0;   # from the same node
//!   oifname VETH meta mark != 0 meta mark != TAG drop comment "<alloc id>" }
//! chain isolate_output  { type filter hook output priority 0;    # routed in (the overlay)
//!   oifname VETH meta mark != 0 meta mark != TAG drop comment "<alloc id>" }
//! ```
//!
//! The mark is the namespace's 16-bit tag ([`namespace_tag`]); the overlay's VXLAN device
//! carries it to the other node in the packet's GBP field and the receiving kernel restores it,
//! so the same rule decides there. Traffic without a mark (the node itself, the outside world,
//! and anything arriving from another node through a host port, which is published on purpose)
//! is not filtered. One gap, known: an allocation reaching another namespace's allocation
//! through a host port *of its own node* keeps its mark through the DNAT and is dropped
//! (exempting DNATed flows needs conntrack in the bridge family, `nf_conntrack_bridge`, which
//! is not loaded everywhere).
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
    // Nothing leaving through the overlay is translated: allocations see each other's addresses.
    let not_overlay = json!({ "match": { "op": "!=", "left": { "meta": { "key": "oifname" } }, "right": settings.vxlan() } });
    let saddr = |p: Value| eq(field("ip", "saddr"), p);
    let masquerade = json!({ "masquerade": null });
    let rules = [
        ("prerouting", dnat.clone()),
        ("output", dnat),
        ("postrouting", json!([saddr(subnet.clone()), oif("!="), not_overlay, masquerade])),
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

/// The 16-bit tag of a namespace, the packet mark of its allocations' traffic (never 0, which
/// stands for traffic that is not an allocation's). FNV-1a folded to 16 bits: two namespaces
/// may share a tag (one chance in 65,535 per pair), and would then reach each other; exact tags
/// assigned by the servers come with namespaces as objects (issue 15).
pub fn namespace_tag(namespace: &str) -> u32 {
    let ns = if namespace.is_empty() { "default" } else { namespace };
    let mut h: u32 = 0x811c_9dc5;
    for b in ns.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let t = (h >> 16) ^ (h & 0xffff);
    if t == 0 {
        1
    } else {
        t
    }
}

const ISOLATION_CHAINS: [(&str, &str, i32); 3] =
    [("tagging", "prerouting", -200), ("isolate_forward", "forward", 0), ("isolate_output", "output", 0)];

/// The bridge-family table's commands: the table and its three base chains (kept, with their
/// rules, when they exist).
fn isolation_table(settings: &NetworkSettings) -> Vec<Value> {
    let t = settings.table();
    let mut cmds = vec![json!({ "add": { "table": { "family": "bridge", "name": t } } })];
    for (chain, hook, prio) in ISOLATION_CHAINS {
        cmds.push(json!({ "add": { "chain": { "family": "bridge", "table": t, "name": chain, "type": "filter", "hook": hook, "prio": prio, "policy": "accept" } } }));
    }
    cmds
}

fn meta(key: &str) -> Value {
    json!({ "meta": { "key": key } })
}

fn cmp(op: &str, left: Value, right: Value) -> Value {
    json!({ "match": { "op": op, "left": left, "right": right } })
}

/// The isolation rules of `net` (see the module comment).
fn isolation_rules(settings: &NetworkSettings, net: &AllocNetwork) -> Vec<Value> {
    let t = settings.table();
    let tag = namespace_tag(&net.namespace);
    let veth = net.host_veth.as_str();
    let rule = |chain: &str, expr: Value| json!({ "add": { "rule": { "family": "bridge", "table": t, "chain": chain, "comment": net.alloc_id, "expr": expr } } });
    let guard = json!([
        cmp("==", meta("oifname"), json!(veth)),
        cmp("!=", meta("mark"), json!(0)),
        cmp("!=", meta("mark"), json!(tag)),
        { "drop": null }
    ]);
    vec![
        rule(
            "tagging",
            json!([cmp("==", meta("iifname"), json!(veth)), cmp("!=", field("ip", "saddr"), json!(net.ip.to_string())), { "drop": null }]),
        ),
        rule(
            "tagging",
            json!([cmp("==", meta("iifname"), json!(veth)), { "mangle": { "key": { "meta": { "key": "mark" } }, "value": tag } }]),
        ),
        rule("isolate_forward", guard.clone()),
        rule("isolate_output", guard),
    ]
}

/// Adds `net`'s rules: its host port mappings (TCP and UDP) and its namespace isolation, in one
/// transaction.
pub fn add_alloc(settings: &NetworkSettings, net: &AllocNetwork) -> Result<(), NetworkError> {
    let mut cmds = isolation_table(settings);
    cmds.extend(isolation_rules(settings, net));
    for p in &net.ports {
        for proto in PROTOCOLS {
            let expr = json!([eq(field(proto, "dport"), json!(p.host_port)), { "dnat": { "family": "ip", "addr": net.ip.to_string(), "port": p.to } }]);
            cmds.push(rule_cmd("add", settings, json!({ "comment": net.alloc_id, "expr": expr })));
        }
    }
    apply("adding the allocation's rules", cmds)
}

/// Handles of the isolation rules, with their allocation ids; none when the table is missing.
fn isolation_handles(settings: &NetworkSettings) -> Result<Vec<(String, u64, String)>, NetworkError> {
    let t = settings.table();
    let raw = match nftables::helper::get_current_ruleset_raw(nftables::helper::DEFAULT_NFT, ["-j", "list", "table", "bridge", t.as_str()])
    {
        Ok(raw) => raw,
        Err(nftables::helper::NftablesError::NftFailed { stderr, .. }) if stderr.contains("No such file or directory") => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(nft_error("listing isolation rules")(e)),
    };
    let doc: Value =
        serde_json::from_str(&raw).map_err(|e| NetworkError::Nft { what: "listing isolation rules".into(), message: e.to_string() })?;
    Ok(doc["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|o| &o["rule"])
        .filter_map(|r| {
            Some((r["chain"].as_str()?.to_string(), r["handle"].as_u64()?, r["comment"].as_str().unwrap_or_default().to_string()))
        })
        .collect())
}

/// Removes the isolation rules of the allocations `gone` selects.
fn remove_isolation(settings: &NetworkSettings, gone: impl Fn(&str) -> bool) -> Result<(), NetworkError> {
    let t = settings.table();
    let cmds: Vec<Value> = isolation_handles(settings)?
        .into_iter()
        .filter(|(_, _, id)| gone(id))
        .map(|(chain, handle, _)| json!({ "delete": { "rule": { "family": "bridge", "table": t, "chain": chain, "handle": handle, "expr": [] } } }))
        .collect();
    if cmds.is_empty() {
        return Ok(());
    }
    apply("removing isolation rules", cmds)
}

/// Removes `net`'s rules (those still there): port mappings and isolation.
pub fn remove_alloc(settings: &NetworkSettings, net: &AllocNetwork) -> Result<(), NetworkError> {
    let isolation = remove_isolation(settings, |id| id == net.alloc_id);
    remove_ports(settings, net)?;
    isolation
}

/// Removes the isolation rules of every allocation not in `keep` (agent start).
pub fn remove_isolation_except(settings: &NetworkSettings, keep: &BTreeSet<String>) -> Result<(), NetworkError> {
    remove_isolation(settings, |id| !keep.contains(id))
}

/// The isolation rules' allocation ids, one per rule (for tests and leftovers checks).
pub fn isolation_rule_owners(settings: &NetworkSettings) -> Result<Vec<String>, NetworkError> {
    Ok(isolation_handles(settings)?.into_iter().map(|(_, _, id)| id).collect())
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
