//! Bridge-mode networking (`mlp_agent::network`) against the real kernel: every test runs on a
//! thread moved into a network namespace of its own (the manager's threads and `nft` inherit
//! it), so the node bridge, sysctls and nftables table it makes never touch the machine's, and
//! all of it disappears with the thread. Needs root and `nft`.
//!
//! `setup_time_per_allocation` is the benchmark of docs/benchmarks.md: it prints p50/p99 of the
//! set-up of `MLP_NET_BENCH_N` (default 50) allocations.

#[path = "../../tests/prereq/mod.rs"]
mod prereq;

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlp_agent::network::{netns, nft, AllocNetwork, NetworkManager, NetworkSettings, Subnet};
use mlp_proto::v1::AllocatedPort;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Runs `f` with a data dir on a thread inside a fresh network namespace (with `lo` up), on a
/// current-thread runtime; the namespace goes when the thread ends, and the namespaces' bind
/// mounts under the data dir are unmounted afterwards even when `f` failed.
fn in_fresh_netns<F, Fut>(f: F) -> TestResult
where
    F: FnOnce(PathBuf) -> Fut + Send + 'static,
    Fut: Future<Output = TestResult>,
{
    let dir = tempfile::tempdir()?;
    let data = dir.path().to_path_buf();
    let result = run_in_fresh_netns(move || f(data));
    for ns in std::fs::read_dir(dir.path().join("netns")).into_iter().flatten().flatten() {
        let _ = netns::remove(&ns.path());
    }
    result
}

fn run_in_fresh_netns<F, Fut>(f: F) -> TestResult
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = TestResult>,
{
    let thread = std::thread::spawn(move || -> TestResult {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            handle.link().set(rtnetlink::LinkUnspec::new_with_index(1).up().build()).execute().await?;
            f().await
        })
    });
    thread.join().map_err(|_| "test thread panicked")?
}

fn settings() -> NetworkSettings {
    NetworkSettings {
        bridge: "mlptest0".into(),
        subnet: Subnet { network: Ipv4Addr::new(172, 26, 64, 0), prefix: 24 },
        ..Default::default()
    }
}

fn port(label: &str, host_port: u32, to: u32) -> AllocatedPort {
    AllocatedPort { label: label.into(), host_port, to }
}

/// A TCP server inside `ns` on `port` answering every connection with `reply`, until dropped.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(ns: &Path, port: u16, reply: &'static str) -> Result<Server, Box<dyn std::error::Error + Send + Sync>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, flag) = (ns.to_path_buf(), stop.clone());
        let thread = std::thread::spawn(move || {
            let bound = netns::enter(&ns).map_err(|e| e.to_string()).and_then(|()| {
                let l = TcpListener::bind(("0.0.0.0", port)).map_err(|e| e.to_string())?;
                l.set_nonblocking(true).map_err(|e| e.to_string())?;
                Ok(l)
            });
            let listener = match bound {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.write_all(reply.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5))??;
        Ok(Server { stop, thread: Some(thread) })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects to `addr` (within 3 s) and reads what the server says.
fn fetch(addr: SocketAddr) -> Result<String, std::io::Error> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// [`fetch`] from inside the namespace `ns` (a thread of its own).
fn fetch_from(ns: &Path, addr: SocketAddr) -> Result<String, String> {
    let ns = ns.to_path_buf();
    std::thread::spawn(move || {
        netns::enter(&ns).map_err(|e| e.to_string())?;
        fetch(addr).map_err(|e| format!("{addr}: {e}"))
    })
    .join()
    .map_err(|_| "fetch thread panicked".to_string())?
}

async fn leftovers(m: &NetworkManager, nets: &[&AllocNetwork]) -> Result<Vec<String>, Box<dyn std::error::Error + Send + Sync>> {
    let mut found = Vec::new();
    for n in nets {
        if n.netns.exists() {
            found.push(format!("netns file {}", n.netns.display()));
        }
    }
    for l in mlp_agent::network::links::bridge_ports(&m.settings().bridge).await? {
        found.push(format!("veth {l}"));
    }
    for mapping in nft::mapped(&m.settings())? {
        found.push(format!("port mapping {mapping}"));
    }
    for owner in nft::isolation_rule_owners(&m.settings())? {
        found.push(format!("isolation rule of {owner}"));
    }
    Ok(found)
}

#[test]
fn allocations_are_reachable_by_host_port_and_address_and_leave_nothing() -> TestResult {
    if !prereq::require(&[prereq::Need::Root, prereq::Need::Nft]) {
        return Ok(());
    }
    in_fresh_netns(|dir| async move {
        let m = NetworkManager::new(settings(), &dir);
        let (a, _) = m.setup("alloc-a", "default", &[port("http", 20_000, 8080)]).await?;
        let (b, _) = m.setup("alloc-b", "default", &[]).await?;
        assert_eq!((a.ip, b.ip), (Ipv4Addr::new(172, 26, 64, 2), Ipv4Addr::new(172, 26, 64, 3)));
        assert!(netns::exists(&a.netns));
        let _server = Server::start(&a.netns, 8080, "hello from a")?;
        let gateway = settings().subnet.gateway();
        // From the node: the host port on 127.0.0.1 and on the bridge's address (DNAT in the
        // output hook), and the allocation's own address.
        for addr in [SocketAddr::from(([127, 0, 0, 1], 20_000)), SocketAddr::from((gateway, 20_000)), SocketAddr::from((a.ip, 8080))] {
            assert_eq!(fetch(addr).map_err(|e| format!("{addr}: {e}"))?, "hello from a", "{addr}");
        }
        // From the other allocation: by address, and through the node's host port (hairpin).
        for addr in [SocketAddr::from((a.ip, 8080)), SocketAddr::from((gateway, 20_000))] {
            assert_eq!(fetch_from(&b.netns, addr)?, "hello from a", "from b to {addr}");
        }
        drop(_server);
        m.teardown("alloc-a").await;
        m.teardown("alloc-b").await;
        assert_eq!(leftovers(&m, &[&a, &b]).await?, Vec::<String>::new());
        // The next allocation gets the lowest address again.
        let (c, _) = m.setup("alloc-c", "default", &[]).await?;
        assert_eq!(c.ip, a.ip);
        m.teardown("alloc-c").await;
        Ok(())
    })
}

#[test]
fn allocations_of_different_namespaces_cannot_reach_each_other() -> TestResult {
    if !prereq::require(&[prereq::Need::Root, prereq::Need::Nft]) {
        return Ok(());
    }
    in_fresh_netns(|dir| async move {
        let m = NetworkManager::new(settings(), &dir);
        let (srv, _) = m.setup("alloc-srv", "team-a", &[]).await?;
        let (same, _) = m.setup("alloc-same", "team-a", &[]).await?;
        let (other, _) = m.setup("alloc-other", "team-b", &[]).await?;
        assert_ne!(nft::namespace_tag("team-a"), nft::namespace_tag("team-b"));
        let _server = Server::start(&srv.netns, 8080, "hello from team-a")?;
        let addr = SocketAddr::from((srv.ip, 8080));
        assert_eq!(fetch_from(&same.netns, addr)?, "hello from team-a", "same namespace");
        assert_eq!(fetch(addr).map_err(|e| e.to_string())?, "hello from team-a", "from the node itself");
        let refused = fetch_from(&other.netns, addr);
        assert!(refused.is_err(), "team-b reached team-a's allocation: {refused:?}");
        // Removing an allocation removes its isolation rules, and only its own.
        m.teardown("alloc-other").await;
        let owners = nft::isolation_rule_owners(&m.settings())?;
        assert!(!owners.iter().any(|o| o == "alloc-other") && owners.iter().any(|o| o == "alloc-srv"), "{owners:?}");
        drop(_server);
        m.teardown("alloc-srv").await;
        m.teardown("alloc-same").await;
        assert_eq!(leftovers(&m, &[&srv, &same, &other]).await?, Vec::<String>::new());
        Ok(())
    })
}

#[test]
fn a_restarted_agent_reattaches_untouched_and_removes_what_is_gone() -> TestResult {
    if !prereq::require(&[prereq::Need::Root, prereq::Need::Nft]) {
        return Ok(());
    }
    in_fresh_netns(|dir| async move {
        let first = NetworkManager::new(settings(), &dir);
        let (kept, _) = first.setup("kept", "default", &[port("http", 20_001, 8080)]).await?;
        let (gone, _) = first.setup("gone", "default", &[port("http", 20_002, 8080)]).await?;
        let _server = Server::start(&kept.netns, 8080, "still here")?;
        drop(first);
        // A new agent run: "kept" is still running, "gone" ended meanwhile.
        let second = NetworkManager::new(settings(), &dir);
        second.remove_leftovers(&BTreeSet::from(["kept".to_string()])).await;
        let (again, took) = second.setup("kept", "default", &[port("http", 20_001, 8080)]).await?;
        assert_eq!((again, took), (kept.clone(), Duration::ZERO), "reattached, not set up again");
        assert_eq!(fetch(SocketAddr::from(([127, 0, 0, 1], 20_001)))?, "still here");
        assert!(!gone.netns.exists());
        assert!(fetch(SocketAddr::from(([127, 0, 0, 1], 20_002))).is_err(), "the gone allocation's port is unmapped");
        // A new address never collides with the kept one.
        let (other, _) = second.setup("other", "default", &[]).await?;
        assert_ne!(other.ip, kept.ip);
        drop(_server);
        second.remove_leftovers(&BTreeSet::new()).await;
        assert_eq!(leftovers(&second, &[&kept, &gone, &other]).await?, Vec::<String>::new());
        Ok(())
    })
}

#[test]
fn setup_time_per_allocation() -> TestResult {
    if !prereq::require(&[prereq::Need::Root, prereq::Need::Nft]) {
        return Ok(());
    }
    let n: usize = std::env::var("MLP_NET_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    in_fresh_netns(move |dir| async move {
        let m = NetworkManager::new(settings(), &dir);
        // The first set-up also makes the bridge and the table: not counted.
        m.setup("warm", "default", &[port("p", 20_999, 80)]).await?;
        let mut times = Vec::with_capacity(n);
        let began = Instant::now();
        for i in 0..n {
            let ports = [port("http", 21_000 + i as u32, 8080)];
            let (_, took) = m.setup(&format!("alloc-{i}"), "default", &ports).await?;
            times.push(took);
        }
        let total = began.elapsed();
        let mut teardown = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            m.teardown(&format!("alloc-{i}")).await;
            teardown.push(t.elapsed());
        }
        m.teardown("warm").await;
        times.sort();
        teardown.sort();
        let pct = |v: &[Duration], p: usize| v[(v.len() * p / 100).min(v.len() - 1)].as_secs_f64() * 1000.0;
        println!(
            "network set-up per allocation (netns + veth + address + routes + port mapping), n={n}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, mean {:.2} ms; teardown p50 {:.2} ms, p99 {:.2} ms",
            pct(&times, 50),
            pct(&times, 99),
            pct(&times, 100),
            total.as_secs_f64() * 1000.0 / n as f64,
            pct(&teardown, 50),
            pct(&teardown, 99),
        );
        assert_eq!(leftovers(&m, &[]).await?, Vec::<String>::new());
        Ok(())
    })
}
