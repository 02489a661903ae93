//! Service discovery end to end on `mlp dev` (as root, issue 13 §3): a bridge-mode job with a
//! `service` block and an http check becomes a passing instance in `/v1/service/NAME`, in
//! `mlp service info` and in the agent's DNS responder (queried on the bridge's gateway, and by
//! name from another bridge-mode task through its resolv.conf); a failing check takes it out of
//! DNS and the API within two check intervals (plus slack); a kill -9 and restart of `mlp dev`
//! keeps a healthy instance unchanged and still watched; stopping the job deregisters it; a
//! name outside service.mlp is forwarded to the upstream resolver (a fake one the test runs).
//!
//! DNS queries are built and parsed with `hickory-proto`, the library the responder itself
//! uses, as a dev-dependency: a hand-built packet would test our reading of the RFC twice.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{prereq, wait_for, Dev};
use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// A bridge, subnet and table of this test process; removed on drop (as in tests/network.rs).
struct TestNet {
    bridge: String,
    prefix: String,
}

impl TestNet {
    fn new() -> TestNet {
        let pid = std::process::id();
        TestNet { bridge: format!("mlps{}", pid % 100_000), prefix: format!("172.28.{}", pid % 250) }
    }

    fn subnet(&self) -> String {
        format!("{}.0/24", self.prefix)
    }

    fn gateway(&self) -> SocketAddr {
        SocketAddr::new(format!("{}.1", self.prefix).parse().expect("gateway"), 53)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let out = Command::new("ip").args(["-j", "link", "show", "master", &self.bridge]).output();
        let v: serde_json::Value = out.ok().and_then(|o| serde_json::from_slice(&o.stdout).ok()).unwrap_or_default();
        for l in v.as_array().into_iter().flatten() {
            if let Some(name) = l["ifname"].as_str() {
                let _ = Command::new("ip").args(["link", "del", name]).output();
            }
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
        let _ = Command::new("nft").args(["delete", "table", "ip", &format!("mlp_{}", self.bridge)]).output();
    }
}

/// Unmounts namespaces a failed test left under the data dir.
struct NetnsGuard(PathBuf);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let dir = self.0.join("agent").join("netns");
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// A fake upstream resolver on 127.0.0.1: every A query gets 192.0.2.7 (TEST-NET-1).
fn fake_upstream() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind the fake upstream");
    let addr = sock.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
            let Some(query) = q.queries().first().cloned() else { continue };
            let mut r = Message::new();
            r.set_id(q.id()).set_message_type(MessageType::Response).set_recursion_available(true).add_query(query.clone());
            r.add_answer(Record::from_rdata(query.name().clone(), 60, RData::A(A(Ipv4Addr::new(192, 0, 2, 7)))));
            let _ = sock.send_to(&r.to_vec().expect("encode"), peer);
        }
    });
    addr
}

/// One UDP query to `server`; the parsed answer.
fn dns(server: SocketAddr, name: &str, t: RecordType) -> Message {
    let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut q = Message::new();
    q.set_id(4242).set_recursion_desired(true).add_query(Query::query(Name::from_ascii(name).expect("name"), t));
    sock.send_to(&q.to_vec().expect("encode"), server).expect("send");
    let mut buf = [0u8; 4096];
    let (n, _) = sock.recv_from(&mut buf).unwrap_or_else(|e| panic!("no DNS answer from {server} for {name}: {e}"));
    let m = Message::from_vec(&buf[..n]).expect("a DNS message");
    assert_eq!(m.id(), 4242);
    m
}

fn a_records(m: &Message) -> Vec<String> {
    m.answers().iter().filter_map(|r| r.data().and_then(|d| d.as_a()).map(|a| a.0.to_string())).collect()
}

/// The instances of `name` from the HTTP API (empty when it has none: 404).
fn instances(dev: &Dev, query: &str) -> Vec<serde_json::Value> {
    instances_of(dev, "web", query)
}

fn instances_of(dev: &Dev, name: &str, query: &str) -> Vec<serde_json::Value> {
    let (code, body) = dev.http("GET", &format!("/v1/service/{name}{query}"), None, b"");
    match code {
        200 => serde_json::from_str::<serde_json::Value>(&body).expect("json").as_array().cloned().unwrap_or_default(),
        404 => Vec::new(),
        _ => panic!("GET /v1/service/{name}{query}: {code} {body}"),
    }
}

/// The HTTP address of the dev cluster.
fn dev_http_addr(dev: &Dev) -> String {
    dev.http.clone()
}

/// GET `path` with the body and the `X-Mlp-Index` header.
fn get_with_index(dev: &Dev, path: &str) -> (String, u64) {
    get_with_index_at(&dev_http_addr(dev), path)
}

fn get_with_index_at(addr: &str, path: &str) -> (String, u64) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(90))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    let index = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-mlp-index:").map(|v| v.trim().parse::<u64>().expect("index")))
        .unwrap_or_else(|| panic!("no X-Mlp-Index in {head}"));
    (body.to_string(), index)
}

const WEB: &str = r#"
job "web" {
  type = "service"
  group "web" {
    network {
      mode = "bridge"
      port "http" {
        to = 8080
      }
    }
    service {
      name = "web"
      port = "http"
      tags = ["v1", "blue"]
      check {
        type     = "http"
        path     = "/health"
        interval = "1s"
        timeout  = "1s"
      }
    }
    task "srv" {
      driver = "exec"
      config {
        command = "/bin/sh"
        args    = ["-c", "echo ok > /local/health; exec /usr/bin/python3 -m http.server 8080 --bind 0.0.0.0 --directory /local"]
      }
      # A task-level service whose script check connects to 127.0.0.1:8080: it passes only
      # when the check runs in the allocation's network namespace (nothing listens on the host's).
      service {
        name = "web-local"
        check {
          type     = "script"
          command  = "/usr/bin/python3"
          args     = ["-c", "import socket; socket.create_connection(('127.0.0.1', 8080), 1)"]
          interval = "1s"
          timeout  = "1s"
        }
      }
      service {
        name = "web-nocheck"
        port = 8080
      }
    }
  }
}
"#;

/// The check's interval in WEB.
const INTERVAL: Duration = Duration::from_secs(1);

#[test]
fn a_service_with_an_http_check_is_found_by_api_and_dns_and_leaves_when_unhealthy() {
    if !common::require_exec() || !prereq::require(&[prereq::Need::Nft, prereq::Need::NetNs]) {
        return;
    }
    assert!(
        std::path::Path::new("/usr/bin/python3").exists(),
        "this test cannot run: missing /usr/bin/python3 (the service's HTTP server); install it with `apt-get install python3` (.ci/run does)"
    );
    let net = TestNet::new();
    let upstream = fake_upstream();
    let subnet = net.subnet();
    let up = upstream.to_string();
    let mut dev = Dev::start_with(&["--network-bridge", &net.bridge, "--network-subnet", &subnet, "--dns-upstream", &up]);
    let _ns = NetnsGuard(dev.data_dir());
    dev.ok(&["job", "run", dev.write_job("web.hcl", WEB).to_str().expect("path")]);

    // Passing in the API, with the allocation's address and the port inside it.
    let inst = wait_for("a passing instance of web", Duration::from_secs(60), || {
        let v = instances(&dev, "?passing=true");
        (v.len() == 1).then(|| v[0].clone())
    });
    let ip = inst["address"].as_str().expect("address").to_string();
    assert!(ip.starts_with(&format!("{}.", net.prefix)), "address {ip} is in {subnet}");
    assert_eq!(inst["port"], 8080);
    assert_eq!(inst["tags"], serde_json::json!(["v1", "blue"]));
    assert!(inst["output"].as_str().unwrap_or("").contains("200"), "{inst}");
    let alloc_id = inst["alloc_id"].as_str().expect("alloc id").to_string();

    // Task-level services: a script check run in the allocation's namespace, and no check
    // (passing while the task runs).
    for name in ["web-local", "web-nocheck"] {
        let i = wait_for(&format!("a passing instance of {name}"), Duration::from_secs(30), || {
            let v = instances_of(&dev, name, "?passing=true");
            (v.len() == 1).then(|| v[0].clone())
        });
        assert_eq!((i["task"].as_str(), i["address"].as_str()), (Some("srv"), Some(ip.as_str())), "{i}");
    }
    assert!(
        std::net::TcpStream::connect_timeout(&"127.0.0.1:8080".parse().expect("addr"), Duration::from_secs(1)).is_err(),
        "nothing listens on the host's 127.0.0.1:8080, so the script check did run in the allocation's namespace"
    );

    // The CLI.
    let list = dev.ok(&["service", "list"]);
    assert!(list.lines().any(|l| l.starts_with("web ") && l.contains("default")), "{list}");
    let info = dev.ok(&["service", "info", "web"]);
    assert!(info.contains(&format!("{ip}:8080")) && info.contains("passing"), "{info}");

    // DNS on the gateway: A, SRV (port and a target that resolves), and a forwarded name.
    let gw = net.gateway();
    let a = wait_for("web.service.mlp in DNS", Duration::from_secs(20), || {
        let m = dns(gw, "web.service.mlp.", RecordType::A);
        (a_records(&m) == vec![ip.clone()]).then_some(m)
    });
    assert_eq!(a.response_code(), ResponseCode::NoError);
    let srv = dns(gw, "_web._tcp.service.mlp.", RecordType::SRV);
    let ports: Vec<u16> = srv.answers().iter().filter_map(|r| r.data().and_then(|d| d.as_srv()).map(|s| s.port())).collect();
    assert_eq!(ports, vec![8080]);
    let fwd = dns(gw, "example.com.", RecordType::A);
    assert_eq!((fwd.response_code(), a_records(&fwd)), (ResponseCode::NoError, vec!["192.0.2.7".to_string()]), "forwarded upstream");

    // A bridge-mode task resolves the name through its /etc/resolv.conf.
    let client = r#"
job "client" {
  type = "batch"
  group "c" {
    network {
      mode = "bridge"
    }
    task "resolve" {
      driver = "exec"
      config {
        command = "/usr/bin/python3"
        args    = ["-c", "import socket; open('/local/out.txt', 'w').write(socket.gethostbyname('web.service.mlp') + ' ' + socket.gethostbyname('web') + ' ' + open('/etc/resolv.conf').read())"]
      }
    }
  }
}
"#;
    dev.ok(&["job", "run", dev.write_job("client.hcl", client).to_str().expect("path")]);
    let done = dev.wait_allocs("client", "the client to finish", Duration::from_secs(60), |a| {
        a.len() == 1 && ["complete", "failed"].contains(&common::status(&a[0]))
    });
    let cid = done[0]["id"].as_str().expect("alloc id");
    let out_path = dev.data_dir().join("agent").join("allocs").join(cid).join("resolve").join("local").join("out.txt");
    let out =
        std::fs::read_to_string(&out_path).unwrap_or_else(|e| panic!("{}: {e}\n{}", out_path.display(), common::tail(&dev.log(), 3000)));
    assert!(out.starts_with(&format!("{ip} {ip} ")), "the task resolved web.service.mlp (and web, by the search domain) to {ip}: {out}");

    // A blocking query from the current index returns once the instance changes (below).
    let (_, index) = get_with_index(&dev, "/v1/service/web");
    let http_addr = dev_http_addr(&dev);
    let blocked = std::thread::spawn(move || {
        let t = Instant::now();
        let (body, next) = get_with_index_at(&http_addr, &format!("/v1/service/web?index={index}&wait=60s"));
        (body, next, t.elapsed())
    });

    // The check starts failing: out of DNS and the passing API within two intervals. The bound
    // is 2 × 1 s plus 8 s of slack for a loaded machine (a check run, one Raft entry, the
    // stream to the agent); the figure this asserts is "gone", not how fast.
    let health = dev.data_dir().join("agent").join("allocs").join(&alloc_id).join("srv").join("local").join("health");
    std::fs::remove_file(&health).expect("remove the health file");
    let t0 = Instant::now();
    let bound = 2 * INTERVAL + Duration::from_secs(8);
    wait_for("web to leave DNS and the passing instances", bound, || {
        let gone_dns = dns(gw, "web.service.mlp.", RecordType::A).response_code() == ResponseCode::NXDomain;
        (gone_dns && instances(&dev, "?passing=true").is_empty()).then_some(())
    });
    assert!(t0.elapsed() <= bound);
    let all = instances(&dev, "");
    assert_eq!(all.len(), 1, "the instance is still registered, as critical: {all:?}");
    assert_eq!(all[0]["health"], "critical");
    assert!(all[0]["output"].as_str().unwrap_or("").contains("404"), "{}", all[0]);
    let (body, next, took) = blocked.join().expect("the blocking query");
    assert!(next > index, "the blocking query answered at a later index ({next} > {index})");
    assert!(took < Duration::from_secs(50), "it returned on the change, not at the end of its wait ({took:?})");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v[0]["health"], "critical", "{body}");

    // Healthy again, back in DNS.
    std::fs::write(&health, "ok\n").expect("restore the health file");
    wait_for("web back in DNS", Duration::from_secs(20), || {
        (a_records(&dns(gw, "web.service.mlp.", RecordType::A)) == vec![ip.clone()]).then_some(())
    });

    // kill -9 of `mlp dev` and a restart: the restarted agent re-checks the reattached
    // allocation at once and registers the same passing instance, which is no change on the
    // server (its modify index stays), and its DNS responder answers again.
    let before = instances(&dev, "?passing=true");
    assert_eq!(before.len(), 1, "{before:?}");
    dev.kill9();
    dev.spawn();
    wait_for("web in DNS after the restart", Duration::from_secs(30), || {
        std::panic::catch_unwind(|| a_records(&dns(gw, "web.service.mlp.", RecordType::A))).ok().filter(|a| *a == vec![ip.clone()])
    });
    // A few check intervals for the agent's re-registration to have landed.
    std::thread::sleep(3 * INTERVAL);
    let after = instances(&dev, "?passing=true");
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0]["modify_index"], before[0]["modify_index"], "re-registering a healthy instance changed it: {after:?}");
    // ... and the restarted agent does watch it: a failing check takes it out again.
    std::fs::remove_file(&health).expect("remove the health file");
    wait_for("web to leave DNS after the restart", bound, || {
        (dns(gw, "web.service.mlp.", RecordType::A).response_code() == ResponseCode::NXDomain).then_some(())
    });
    std::fs::write(&health, "ok\n").expect("restore the health file");

    // Stopping the job deregisters it everywhere.
    dev.ok(&["job", "stop", "web"]);
    wait_for("web to be deregistered", Duration::from_secs(30), || {
        ["web", "web-local", "web-nocheck"].iter().all(|n| instances_of(&dev, n, "").is_empty()).then_some(())
    });
    wait_for("web out of DNS", Duration::from_secs(10), || {
        (dns(gw, "web.service.mlp.", RecordType::A).response_code() == ResponseCode::NXDomain).then_some(())
    });
    let list = dev.ok(&["service", "list"]);
    assert!(list.contains("No services registered."), "{list}");
}
