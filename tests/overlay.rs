//! The overlay across hosts (issue 13 §2, §4, §5), as root: one `mlp server` and two `mlp agent`s,
//! each host its own network namespace of the multi-host harness (addresses in 198.18.0.0/15).
//!
//! * the servers lease each node its own subnet of the cluster CIDR, and every agent programs
//!   routes to the other's;
//! * an allocation on host B is reached by its own address from host A (the node itself, and a
//!   client allocation there) with no NAT, and through its host port on host B;
//! * an allocation of another namespace on host A cannot reach it;
//! * killing host B's agent with kill -9 leaves the allocation reachable;
//! * a node that goes down leaves the other agent's routes, and returns to them;
//! * stopping everything leaves no allocation veth, namespace or rule behind;
//! * a two-rank gang job on the two hosts performs an all-reduce over TCP written with Python's
//!   standard library, finding rank 0 through the rendezvous variables.
//!
//! Tasks are `raw_exec` in bridge mode (they join the allocation's network namespace): the
//! harness runs agents under `ip netns exec`, whose fresh `/sys` hides the cgroup hierarchy
//! the `exec` driver needs.

#[path = "multihost/mod.rs"]
mod multihost;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use multihost::{prereq, wait_for, Net};

const FORM: Duration = Duration::from_secs(60);

fn need() -> bool {
    multihost::require_netns(&[prereq::Need::Nft])
}

/// Runs `argv` inside host `ns`, killed after `timeout`.
fn run_in(ns: &str, argv: &[&str], timeout: Duration) -> Option<Output> {
    let child = Command::new("timeout")
        .arg(format!("{}", timeout.as_secs().max(1)))
        .args(["ip", "netns", "exec", ns])
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child.wait_with_output().ok()
}

/// An HTTP GET of `url` from host `ns` with Python's standard library: the body, or the error.
fn http_from(ns: &str, url: &str) -> Result<String, String> {
    let script = format!("import urllib.request; print(urllib.request.urlopen('{url}', timeout=3).read().decode(), end='')");
    let out = run_in(ns, &["/usr/bin/python3", "-c", &script], Duration::from_secs(8)).ok_or("could not run python3")?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default().to_string())
    }
}

/// The A records `server` (port 53) answers for `name`, asked from inside `ns` (the test's
/// own small DNS client in Python's standard library: one UDP query, names skipped whether
/// compressed or not).
fn dns_a_from(ns: &str, server: &str, name: &str) -> Result<Vec<String>, String> {
    let script = format!(
        r#"import socket, struct
q = struct.pack('>HHHHHH', 7, 0x0100, 1, 0, 0, 0) + b''.join(bytes([len(l)]) + l.encode() for l in '{name}'.split('.')) + b'\0' + struct.pack('>HH', 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); s.sendto(q, ('{server}', 53)); r = s.recv(4096)
def skip(i):
    while True:
        n = r[i]
        if n == 0: return i + 1
        if n >= 0xC0: return i + 2
        i += n + 1
an = struct.unpack('>H', r[6:8])[0]; i = skip(12) + 4; out = []
for _ in range(an):
    i = skip(i); t, c, ttl, ln = struct.unpack('>HHIH', r[i:i + 10]); i += 10
    if t == 1: out.append('.'.join(str(b) for b in r[i:i + 4]))
    i += ln
print(' '.join(out), end='')"#
    );
    let out = run_in(ns, &["/usr/bin/python3", "-c", &script], Duration::from_secs(8)).ok_or("could not run python3")?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default().to_string())
    }
}

/// The first `env.txt` a task `task` of a `job` allocation wrote under an agent's data dir.
fn task_env(agent_dir: &Path, task: &str) -> Option<std::collections::BTreeMap<String, String>> {
    for alloc in std::fs::read_dir(agent_dir.join("allocs")).ok()?.flatten() {
        let path = alloc.path().join(task).join("local").join("env.txt");
        if let Ok(text) = std::fs::read_to_string(&path) {
            if text.contains("MLP_") {
                return Some(text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect());
            }
        }
    }
    None
}

/// The addresses of every `srv` allocation under an agent's data dir (newest copies included).
fn server_ips(agent_dir: &Path) -> Vec<String> {
    let allocs = std::fs::read_dir(agent_dir.join("allocs")).into_iter().flatten().flatten();
    allocs
        .filter_map(|a| std::fs::read_to_string(a.path().join("srv").join("local").join("env.txt")).ok())
        .filter_map(|t| t.lines().find_map(|l| l.strip_prefix("MLP_IP_http=").map(str::to_string)))
        .collect()
}

/// The standard output of every task `task` under an agent's data dir.
fn task_logs(agent_dir: &Path, task: &str) -> Vec<String> {
    let allocs = std::fs::read_dir(agent_dir.join("allocs")).into_iter().flatten().flatten();
    allocs.filter_map(|a| std::fs::read_to_string(a.path().join(task).join("logs").join(format!("{task}.stdout.0"))).ok()).collect()
}

fn job_run(net: &Net, host: usize, addr: &str, name: &str, hcl: &str, wait: bool) -> Output {
    let path = net.path(name);
    std::fs::write(&path, hcl).expect("job file");
    let path = path.display().to_string();
    let mut args = vec!["job", "run", "--address", addr];
    if wait {
        args.push("--wait");
    } else {
        args.push("--detach");
    }
    args.push(&path);
    net.mlp(host, &args, Duration::from_secs(90)).expect("mlp job run finished")
}

fn node_json(net: &Net, host: usize, addr: &str) -> Vec<serde_json::Value> {
    let out = net.mlp(host, &["node", "status", "--json", "--address", addr], Duration::from_secs(10)).expect("node status");
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Routes through the overlay device in host `ns`, as `ip route` prints them.
fn overlay_routes(ns: &str) -> Vec<String> {
    let out = run_in(ns, &["ip", "-4", "route", "show", "dev", "mlp0vx"], Duration::from_secs(5));
    out.map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect()).unwrap_or_default()
}

fn server_job(node: &str, namespace: &str) -> String {
    format!(
        r#"job "srv" {{
  type      = "service"
  namespace = "{namespace}"
  group "g" {{
    constraint {{
      attribute = "${{node.name}}"
      value     = "{node}"
    }}
    # Replaced at once when its node comes back after being lost (the service default waits 30 s).
    reschedule {{
      delay = "0s"
    }}
    network {{
      mode = "bridge"
      port "http" {{
        to = 8080
      }}
    }}
    service {{
      name = "srv"
      port = "http"
      check {{
        type     = "http"
        path     = "/index.html"
        interval = "1s"
        timeout  = "1s"
      }}
    }}
    task "srv" {{
      driver = "raw_exec"
      config {{
        command = "/bin/sh"
        args    = ["-c", "echo hello-from-b > $MLP_TASK_DIR/index.html; env > $MLP_TASK_DIR/env.txt; exec /usr/bin/python3 -m http.server 8080 --bind 0.0.0.0 --directory $MLP_TASK_DIR"]
      }}
      resources {{
        cpu    = 50
        memory = 64
      }}
    }}
  }}
}}
"#
    )
}

/// A batch job on `node` in `namespace` that fetches `url` (retrying for up to 10 s) and exits 0
/// on the expected body, 1 otherwise.
fn client_job(name: &str, node: &str, namespace: &str, url: &str) -> String {
    let script = format!(
        "import sys, time, urllib.request\nend = time.time() + 10\nwhile True:\n    try:\n        body = urllib.request.urlopen('{url}', timeout=2).read().decode()\n        print(body)\n        sys.exit(0 if 'hello-from-b' in body else 1)\n    except Exception as e:\n        if time.time() > end:\n            print('unreachable:', e)\n            sys.exit(1)\n        time.sleep(0.2)\n"
    );
    format!(
        r#"job "{name}" {{
  type      = "batch"
  namespace = "{namespace}"
  group "g" {{
    constraint {{
      attribute = "${{node.name}}"
      value     = "{node}"
    }}
    reschedule {{
      attempts  = 0
      unlimited = false
    }}
    restart {{
      attempts = 0
      mode     = "fail"
    }}
    network {{
      mode = "bridge"
    }}
    task "client" {{
      driver = "raw_exec"
      config {{
        command = "/usr/bin/python3"
        args    = ["-c", {script:?}]
      }}
      resources {{
        cpu    = 50
        memory = 64
      }}
    }}
  }}
}}
"#
    )
}

struct Cluster {
    net: Net,
    addr: String,
    /// Host indexes: the server's, agent-0's (host A) and agent-1's (host B).
    server: usize,
    hosts: [usize; 2],
    agents: [usize; 2],
}

impl Cluster {
    fn start() -> Cluster {
        let mut net = Net::new();
        let server = net.add_host("server");
        let hosts = [net.add_host("a"), net.add_host("b")];
        let addr = multihost::start_single_server(&mut net, server, "3");
        let agents = [multihost::start_agent(&mut net, hosts[0], &addr, 0), multihost::start_agent(&mut net, hosts[1], &addr, 1)];
        multihost::wait_ready_nodes(&net.client(server), &addr, 2, FORM);
        Cluster { net, addr, server, hosts, agents }
    }

    fn ns(&self, host: usize) -> String {
        self.net.hosts[host].ns.clone()
    }

    fn agent_dir(&self, i: usize) -> PathBuf {
        self.net.path(&format!("agent{i}"))
    }
}

#[test]
fn allocations_reach_each_other_across_hosts_by_address_and_namespaces_stay_apart() {
    if !need() {
        return;
    }
    let mut c = Cluster::start();
    let (a_ns, b_ns) = (c.ns(c.hosts[0]), c.ns(c.hosts[1]));

    // Leases: each node its own /24 of the default cluster CIDR, sent back to the agents.
    let nodes = node_json(&c.net, c.server, &c.addr);
    let subnets: Vec<String> =
        nodes.iter().filter_map(|n| n.pointer("/overlay/subnet").and_then(|s| s.as_str()).map(str::to_string)).collect();
    assert_eq!(subnets.len(), 2, "both nodes hold a subnet: {nodes:?}");
    assert_ne!(subnets[0], subnets[1]);
    assert!(subnets.iter().all(|s| s.starts_with("172.26.") && s.ends_with(".0/24")), "{subnets:?}");

    let out = job_run(&c.net, c.server, &c.addr, "srv.hcl", &server_job("agent-1", "default"), false);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let env = wait_for("the server allocation's environment", FORM, || task_env(&c.agent_dir(1), "srv"));
    let ip = env["MLP_IP_http"].clone();
    let host_port = env["MLP_HOST_PORT_http"].clone();
    let b_subnet = subnets.iter().find(|s| s.starts_with(ip.rsplit_once('.').map(|x| x.0).unwrap_or_default())).cloned();
    assert!(b_subnet.is_some(), "the allocation's address {ip} is in one of the leased subnets {subnets:?}");

    // Host A's agent builds its end of the overlay once it has a bridge-mode allocation: start
    // a client there in the same namespace, which must reach the server by its address.
    let url = format!("http://{ip}:8080/index.html");
    let out = job_run(&c.net, c.server, &c.addr, "client.hcl", &client_job("client", "agent-0", "default", &url), true);
    assert!(
        out.status.success(),
        "a client allocation on host A reaches {url} over the overlay: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Routes: host A routes host B's subnet through the VXLAN device.
    let routes = overlay_routes(&a_ns);
    assert!(routes.iter().any(|r| r.starts_with(b_subnet.as_deref().unwrap_or("-"))), "host A's overlay routes: {routes:?}");
    // The node itself (host A) reaches it too, and so does anyone through host B's port.
    assert_eq!(http_from(&a_ns, &url).as_deref(), Ok("hello-from-b\n"), "host A → {url}");
    let b_ip = c.net.hosts[c.hosts[1]].ip.clone();
    let by_port = format!("http://{b_ip}:{host_port}/index.html");
    assert_eq!(http_from(&a_ns, &by_port).as_deref(), Ok("hello-from-b\n"), "host A → {by_port}");

    // Service discovery across nodes (issue 13 §3): host A's DNS responder, on its bridge's
    // gateway, answers the name of the instance on host B (registered by host B's agent once its
    // http check passed), and the answer reaches it.
    let a_subnet = nodes
        .iter()
        .find(|n| n["name"] == "agent-0")
        .and_then(|n| n.pointer("/overlay/subnet").and_then(|s| s.as_str()).map(str::to_string))
        .expect("host A's subnet");
    let a_gateway = format!("{}.1", a_subnet.trim_end_matches(".0/24"));
    wait_for("host A's DNS to answer srv.service.mlp with host B's instance", Duration::from_secs(30), || {
        (dns_a_from(&a_ns, &a_gateway, "srv.service.mlp").ok()? == vec![ip.clone()]).then_some(())
    });
    let by_name = format!("http://{ip}:8080/index.html");
    assert_eq!(http_from(&a_ns, &by_name).as_deref(), Ok("hello-from-b\n"), "host A → the address DNS gave");

    // Another namespace on host A cannot reach it by its address (namespaces exist before jobs
    // go into them, issue 15 §5).
    let out = c.net.mlp(c.server, &["namespace", "apply", "--address", &c.addr, "other"], Duration::from_secs(20));
    assert!(out.is_some_and(|o| o.status.success()), "creating namespace other");
    let out = job_run(&c.net, c.server, &c.addr, "other.hcl", &client_job("intruder", "agent-0", "other", &url), true);
    let logs = task_logs(&c.agent_dir(0), "client");
    assert!(
        !out.status.success() && logs.iter().any(|l| l.contains("unreachable")),
        "an allocation of namespace `other` reached `default`'s allocation: {}{}\nclient logs: {logs:?}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // kill -9 host B's agent: the allocation stays reachable through the overlay.
    c.net.procs[c.agents[1]].kill9();
    assert_eq!(http_from(&a_ns, &url).as_deref(), Ok("hello-from-b\n"), "after kill -9 of host B's agent");
    // Host B goes down for the servers (TTL 3 s): host A's routes to it go; when its agent
    // comes back, they return.
    wait_for("host A to drop the route to the node that is down", Duration::from_secs(30), || {
        (!overlay_routes(&a_ns).iter().any(|r| r.starts_with(b_subnet.as_deref().unwrap_or("-")))).then_some(())
    });
    c.net.restart(c.agents[1]);
    wait_for("host A to route to the returning node again", Duration::from_secs(30), || {
        overlay_routes(&a_ns).iter().any(|r| r.starts_with(b_subnet.as_deref().unwrap_or("-"))).then_some(())
    });
    // While host B was down its allocation was marked lost; when it returns, the agent stops
    // that copy and starts the replacement the servers placed there, whose address may differ:
    // whichever copy runs must be reachable from host A over the overlay.
    wait_for("the service on the returning node reachable again", Duration::from_secs(45), || {
        server_ips(&c.agent_dir(1)).iter().find_map(|ip| http_from(&a_ns, &format!("http://{ip}:8080/index.html")).ok())
    });

    // Stop everything: no allocation veth, namespace or rule is left on either host.
    for job in ["srv", "client"] {
        let out = c.net.mlp(c.server, &["job", "stop", "--address", &c.addr, job], Duration::from_secs(20)).expect("job stop");
        assert!(out.status.success(), "stopping {job}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = c.net.mlp(c.server, &["job", "stop", "--namespace", "other", "--address", &c.addr, "intruder"], Duration::from_secs(20));
    assert!(out.is_some_and(|o| o.status.success()), "stopping intruder");
    for (ns, i) in [(&a_ns, 0), (&b_ns, 1)] {
        wait_for(&format!("host {i} to remove every allocation's network"), Duration::from_secs(30), || {
            let links = run_in(ns, &["ip", "-o", "link", "show"], Duration::from_secs(5))?;
            let links = String::from_utf8_lossy(&links.stdout).into_owned();
            let rules = run_in(ns, &["nft", "list", "ruleset"], Duration::from_secs(5))?;
            let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
            let netns_left = std::fs::read_dir(c.agent_dir(i).join("netns")).map(|d| d.count()).unwrap_or(0);
            let clean = !links.contains(": mv") && !rules.contains("dnat to") && !rules.contains("comment") && netns_left == 0;
            if !clean {
                eprintln!("host {i} not clean yet: veths={} netns={netns_left}\n{rules}", links.matches(": mv").count());
            }
            clean.then_some(())
        });
    }
}

const ALLREDUCE: &str = r#"
import os, socket, struct, sys, time
rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
mine = [float(rank + 1) * (i + 1) for i in range(1024)]
fmt = "!1024d"
def recv_all(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("peer closed")
        buf += chunk
    return buf
if rank == 0:
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(os.environ["MLP_PORT_rdzv"]))); srv.listen(size)
    peers = [srv.accept()[0] for _ in range(size - 1)]
    total = list(mine)
    for p in peers:
        for i, v in enumerate(struct.unpack(fmt, recv_all(p, 8 * 1024))):
            total[i] += v
    for p in peers:
        p.sendall(struct.pack(fmt, *total))
else:
    end = time.time() + 30
    while True:
        try:
            s = socket.create_connection((host, port), timeout=3); break
        except OSError:
            if time.time() > end: raise
            time.sleep(0.2)
    s.sendall(struct.pack(fmt, *mine))
    total = list(struct.unpack(fmt, recv_all(s, 8 * 1024)))
expected = [sum(float(r + 1) * (i + 1) for r in range(size)) for i in range(1024)]
ok = total == expected
with open(os.path.join(os.environ["MLP_TASK_DIR"], "result.txt"), "w") as f:
    f.write(f"rank={rank} ok={ok} first={total[0]}\n")
sys.exit(0 if ok else 1)
"#;

#[test]
fn a_two_rank_gang_on_two_hosts_all_reduces_through_the_rendezvous() {
    if !need() {
        return;
    }
    let c = Cluster::start();
    let script = c.net.path("allreduce.py");
    std::fs::write(&script, ALLREDUCE).expect("script");
    // 3,000 MHz per rank: a node (this machine's CPU) fits one, so the ranks land on both hosts.
    let job = format!(
        r#"job "train" {{
  type = "batch"
  group "w" {{
    count = 2
    gang  = true
    network {{
      mode = "bridge"
      port "rdzv" {{
        to = 29500
      }}
    }}
    task "rank" {{
      driver = "raw_exec"
      config {{
        command = "/bin/sh"
        args    = ["-c", "env > $MLP_TASK_DIR/env.txt; exec /usr/bin/python3 {}"]
      }}
      resources {{
        cpu    = 3000
        memory = 64
      }}
    }}
  }}
}}
"#,
        script.display()
    );
    let out = job_run(&c.net, c.server, &c.addr, "train.hcl", &job, true);
    let mut results = Vec::new();
    for i in 0..2 {
        for alloc in std::fs::read_dir(c.agent_dir(i).join("allocs")).into_iter().flatten().flatten() {
            if let Ok(r) = std::fs::read_to_string(alloc.path().join("rank").join("local").join("result.txt")) {
                results.push((i, r));
            }
        }
    }
    assert!(
        out.status.success(),
        "the gang job failed: {}{}\nresults: {results:?}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(results.len(), 2, "both ranks wrote a result: {results:?}");
    assert!(results.iter().any(|(i, _)| *i == 0) && results.iter().any(|(i, _)| *i == 1), "one rank per host: {results:?}");
    assert!(results.iter().all(|(_, r)| r.contains("ok=True") && r.contains("first=3.0")), "{results:?}");
}
