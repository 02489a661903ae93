//! Bridge-mode networking end to end on `mlp dev` (as root): a bridge-mode service answers on
//! its host port and, from a second bridge-mode allocation, on its own address; its tasks see
//! the MLP_* variables; a kill -9 of `mlp dev` leaves it reachable; stopping the jobs leaves no
//! veth, port rule or namespace behind; gang members get the rendezvous variables.
//!
//! Each test uses a bridge, subnet and nftables table of its own (`--network-*` flags), which
//! its guard removes, so tests run in parallel and never touch `mlp0`.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{http_request, prereq, wait_for, Dev};

/// A bridge, subnet and table of this test process; removed on drop.
struct TestNet {
    bridge: String,
    subnet: String,
}

impl TestNet {
    fn new(salt: u32) -> TestNet {
        let pid = std::process::id();
        TestNet { bridge: format!("mlpe{}", (pid * 4 + salt) % 100_000), subnet: format!("172.27.{}.0/24", (pid * 4 + salt) % 250) }
    }

    fn args(&self) -> Vec<String> {
        ["--network-bridge", &self.bridge, "--network-subnet", &self.subnet].iter().map(|s| s.to_string()).collect()
    }

    fn table(&self) -> String {
        format!("mlp_{}", self.bridge)
    }

    /// veths on the bridge.
    fn veths(&self) -> Vec<String> {
        let out = Command::new("ip").args(["-j", "link", "show", "master", &self.bridge]).output().expect("ip link");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v.as_array().into_iter().flatten().filter_map(|l| l["ifname"].as_str().map(String::from)).collect()
    }

    /// Port-mapping rules in the table's `ports` chain.
    fn rules(&self) -> Vec<String> {
        let out = Command::new("nft").args(["-j", "list", "chain", "ip", &self.table(), "ports"]).output().expect("nft");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["nftables"].as_array().into_iter().flatten().filter(|o| o.get("rule").is_some()).map(|o| o["rule"].to_string()).collect()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for veth in self.veths() {
            let _ = Command::new("ip").args(["link", "del", &veth]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
        let _ = Command::new("nft").args(["delete", "table", "ip", &self.table()]).output();
    }
}

/// Unmounts namespaces a failed test left under the data dir (before the temp dir goes).
struct NetnsGuard(PathBuf);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        for ns in netns_files(&self.0) {
            let _ = nix::mount::umount2(&ns, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn netns_files(data_dir: &std::path::Path) -> Vec<PathBuf> {
    std::fs::read_dir(data_dir.join("agent").join("netns")).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

/// `KEY=value` lines of a task's env dump.
fn env_of(dev: &Dev, alloc: &str, task: &str) -> BTreeMap<String, String> {
    let path = dev.data_dir().join("agent").join("allocs").join(alloc).join(task).join("local").join("env.txt");
    let text = wait_for(&format!("{}", path.display()), Duration::from_secs(30), || {
        std::fs::read_to_string(&path).ok().filter(|t| t.contains("MLP_"))
    });
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn running_allocs(dev: &Dev, job: &str, n: usize) -> Vec<serde_json::Value> {
    dev.wait_allocs(job, &format!("{n} running allocations of {job}"), Duration::from_secs(60), |a| {
        a.len() == n && a.iter().all(|a| common::status(a) == "running")
    })
}

fn get(addr: &str, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, None, b"")
}

const SERVER: &str = r#"
job "web" {
  type = "service"
  group "web" {
    network {
      mode = "bridge"
      port "http" {
        to = 8080
      }
      port "spare" {}
    }
    task "srv" {
      driver = "exec"
      config {
        command = "/bin/sh"
        args    = ["-c", "cat /etc/hosts > /local/hosts.txt; env > /local/env.txt; exec /usr/bin/python3 -m http.server 8080 --bind 0.0.0.0 --directory /local"]
      }
    }
  }
}
"#;

#[test]
fn bridge_service_is_reachable_survives_an_agent_kill_and_leaves_nothing() {
    if !common::require_exec() || !prereq::require(&[prereq::Need::Nft, prereq::Need::NetNs]) {
        return;
    }
    let net = TestNet::new(0);
    let args = net.args();
    let mut dev = Dev::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let _ns = NetnsGuard(dev.data_dir());
    dev.ok(&["job", "run", dev.write_job("web.hcl", SERVER).to_str().expect("path")]);
    let web = running_allocs(&dev, "web", 1);
    let web_id = web[0]["id"].as_str().expect("alloc id").to_string();
    let env = env_of(&dev, &web_id, "srv");
    let (ip, host_port) = (env["MLP_IP_http"].clone(), env["MLP_HOST_PORT_http"].clone());
    assert!(ip.starts_with(net.subnet.trim_end_matches("0/24")), "MLP_IP_http={ip} is in {}", net.subnet);
    assert_eq!(env["MLP_PORT_http"], "8080");
    assert_eq!(env["MLP_ADDR_http"], format!("{ip}:8080"));
    let port: u32 = host_port.parse().expect("host port");
    assert!((20_000..=32_000).contains(&port), "dynamic host port {port}");
    assert_eq!(env["MLP_PORT_spare"], env["MLP_HOST_PORT_spare"], "a port without `to` listens on its host port");
    let hosts =
        std::fs::read_to_string(dev.data_dir().join("agent").join("allocs").join(&web_id).join("srv").join("local").join("hosts.txt"))
            .unwrap_or_default();
    assert!(hosts.lines().any(|l| l.starts_with(&format!("{ip}\t"))), "/etc/hosts names the allocation's address:\n{hosts}");

    // From the host: 127.0.0.1:<host port> (DNAT in the output hook).
    let host_addr = format!("127.0.0.1:{host_port}");
    let (code, body) = wait_for("the service on its host port", Duration::from_secs(30), || {
        let r = std::panic::catch_unwind(|| get(&host_addr, "/env.txt")).ok()?;
        (r.0 == 200).then_some(r)
    });
    assert_eq!(code, 200);
    assert!(body.contains("MLP_PORT_http=8080"), "{body}");

    // From a second bridge-mode allocation, by the service's allocation address.
    let client = format!(
        r#"
job "client" {{
  type = "batch"
  group "c" {{
    network {{
      mode = "bridge"
    }}
    task "get" {{
      driver = "exec"
      env {{
        TARGET = "{ip}:8080"
      }}
      config {{
        command = "/usr/bin/python3"
        args    = ["-c", "import os, urllib.request; open('/local/got.txt', 'w').write(urllib.request.urlopen('http://' + os.environ['TARGET'] + '/env.txt', timeout=10).read().decode()); open('/local/env.txt', 'w').write(''.join(k + '=' + v + chr(10) for k, v in os.environ.items()))"]
      }}
    }}
  }}
}}
"#
    );
    dev.ok(&["job", "run", dev.write_job("client.hcl", &client).to_str().expect("path")]);
    let done = dev.wait_allocs("client", "the client to finish", Duration::from_secs(60), |a| {
        a.len() == 1 && ["complete", "failed"].contains(&common::status(&a[0]))
    });
    let client_id = done[0]["id"].as_str().expect("alloc id").to_string();
    let got = dev.data_dir().join("agent").join("allocs").join(&client_id).join("get").join("local").join("got.txt");
    let got = std::fs::read_to_string(&got).unwrap_or_else(|e| {
        let logs = dev.data_dir().join("agent").join("allocs").join(&client_id).join("get").join("logs");
        let stderr: String = std::fs::read_dir(&logs)
            .map(|rd| rd.flatten().map(|f| std::fs::read_to_string(f.path()).unwrap_or_default()).collect())
            .unwrap_or_default();
        panic!("{}: {e}; client task output:\n{stderr}\ndev log:\n{}", got.display(), common::tail(&dev.log(), 3000))
    });
    assert!(got.contains(&format!("MLP_IP_http={ip}")), "{got}");
    assert_eq!(common::status(&done[0]), "complete");
    let client_env = env_of(&dev, &client_id, "get");
    assert_ne!(client_env.get("MLP_ALLOC_IP"), Some(&ip), "two allocations, two addresses");

    // kill -9 of the whole `mlp dev`: the service keeps answering, and after the restart the
    // agent reattaches to its network untouched.
    dev.kill9();
    // Bounded retries, not one try: on a loaded machine the first connection can be refused
    // (seen under parallel test load; the service must answer within the bound all the same).
    let reachable = |what: &str| {
        wait_for(what, Duration::from_secs(15), || std::panic::catch_unwind(|| get(&host_addr, "/env.txt")).ok().filter(|r| r.0 == 200))
    };
    reachable("the service while the agent is down");
    dev.spawn();
    running_allocs(&dev, "web", 1);
    reachable("the service after the agent restarted");
    assert_eq!(net.veths().len(), 1, "the running allocation's veth only: {:?}", net.veths());

    // Stopping the job removes its veth, its port rules and its namespace.
    dev.ok(&["job", "stop", "web"]);
    dev.wait_allocs("web", "the service to stop", Duration::from_secs(60), |a| a.iter().all(|a| common::status(a) != "running"));
    wait_for("the service's network to be removed", Duration::from_secs(20), || {
        (net.veths().is_empty() && net.rules().is_empty() && netns_files(&dev.data_dir()).is_empty()).then_some(())
    });
    assert!(
        std::net::TcpStream::connect_timeout(&host_addr.parse().expect("addr"), Duration::from_secs(2)).is_err(),
        "the host port is unmapped"
    );
}

#[test]
fn gang_members_get_the_rendezvous_variables() {
    if !common::require_exec() || !prereq::require(&[prereq::Need::Nft, prereq::Need::NetNs]) {
        return;
    }
    let net = TestNet::new(1);
    let args = net.args();
    let dev = Dev::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let _ns = NetnsGuard(dev.data_dir());
    let job = r#"
job "train" {
  type = "batch"
  group "w" {
    count = 3
    gang  = true
    network {
      mode = "bridge"
      port "rdzv" {
        to = 29400
      }
    }
    task "rank" {
      driver = "exec"
      config {
        command = "/bin/sh"
        args    = ["-c", "env > /local/env.txt; sleep 1"]
      }
    }
    # raw_exec tasks of a bridge group run in the allocation's namespace too.
    task "probe" {
      driver = "raw_exec"
      config {
        command = "/bin/sh"
        args    = ["-c", "cat /proc/net/dev > net_dev.txt; env > env.txt"]
      }
    }
  }
}
"#;
    dev.ok(&["job", "run", dev.write_job("train.hcl", job).to_str().expect("path")]);
    let allocs = dev.wait_allocs("train", "the gang to finish", Duration::from_secs(60), |a| {
        a.len() == 3 && a.iter().all(|a| common::status(a) == "complete")
    });
    let mut by_rank = BTreeMap::new();
    for a in &allocs {
        let env = env_of(&dev, a["id"].as_str().expect("id"), "rank");
        by_rank.insert(env["RANK"].clone(), env);
    }
    let leader = by_rank["0"].clone();
    for (rank, env) in &by_rank {
        assert_eq!(env["MLP_GANG_RANK"], *rank);
        assert_eq!((env["WORLD_SIZE"].as_str(), env["MLP_GANG_SIZE"].as_str()), ("3", "3"));
        // Rank 0 runs on this node in bridge mode: it is reached at its own address and port.
        assert_eq!(env["MASTER_ADDR"], leader["MLP_IP_rdzv"], "rank {rank}");
        assert_eq!(env["MASTER_PORT"], "29400", "rank {rank}");
        assert_eq!(env["MLP_GANG_LEADER_ADDR"], format!("{}:29400", leader["MLP_IP_rdzv"]));
    }
    for a in &allocs {
        let id = a["id"].as_str().expect("id");
        let (exec_env, raw_env) = (env_of(&dev, id, "rank"), env_of(&dev, id, "probe"));
        assert_eq!(raw_env["MLP_ALLOC_IP"], exec_env["MLP_ALLOC_IP"]);
        assert_eq!(raw_env["RANK"], exec_env["RANK"]);
        // The daemon hands mimalloc its options through its own environment before `main` and
        // takes them out again (src/allocator.rs); tasks get an environment of their own, and
        // it must not carry them either.
        for env in [&raw_env, &exec_env] {
            assert!(!env.keys().any(|k| k.starts_with("MIMALLOC_")), "a task inherited the allocator's options: {env:?}");
        }
        let dev_file = dev.data_dir().join("agent").join("allocs").join(id).join("probe").join("local").join("net_dev.txt");
        let links = std::fs::read_to_string(&dev_file).unwrap_or_default();
        assert!(
            links.contains("eth0:") && !links.contains(&format!("{}:", net.bridge)),
            "raw_exec task outside the allocation's namespace:\n{links}"
        );
    }
    assert_eq!(by_rank.len(), 3);
}
