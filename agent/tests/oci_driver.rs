//! The `oci` driver against a real registry on loopback (`docker-registry`), with images built
//! here from busybox-static: runs by tag and by digest through the alloc and task runners
//! (output in the task's logs, pull progress in its events), a tampered blob refused,
//! whiteouts, registry auth, a registry that goes away mid-pull or is down, shared concurrent
//! pulls and garbage collection, host volumes bound into an image root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mlp_agent::alloc::runner::{spawn_alloc_runner, AllocHandle, RunnerEnv};
use mlp_agent::alloc::state::AllocRegistry;
use mlp_agent::driver::exec::ExecDriver;
use mlp_agent::driver::{Driver, OciDriver};
use mlp_agent::image::{ImageSettings, ImageStore};
use mlp_agent::isolation::IsolationSettings;
use mlp_agent::task::logs::{log_base, LogReader};
use mlp_proto::consts::{alloc_client, task_event};
use mlp_proto::v1::{AllocClientUpdate, Allocation, Job, RegistryAuth, Resources, RestartPolicy, Task, TaskConfig, TaskGroup};
use tokio::sync::mpsc;

mod oci_registry;
#[path = "../../tests/prereq/mod.rs"]
mod prereq;
mod shared;
use oci_registry::{busybox_layer, layer_tar, Compression, CuttingProxy, Entry, Registry, Res, TestImage};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn require() {
    oci_registry::require_tools();
    prereq::require(&[prereq::Need::Root, prereq::Need::Cgroups]);
}

fn settings(budget_bytes: u64) -> ImageSettings {
    ImageSettings { budget_bytes, tries: 3, backoff: Duration::from_millis(100), ..ImageSettings::default() }
}

fn hello_image() -> TestImage {
    TestImage::new(
        vec![(busybox_layer(vec![]), Compression::Gzip)],
        serde_json::json!({
            "Env": ["PATH=/bin", "GREETING=from-the-image"],
            "Cmd": ["sh", "-c", "echo hello $GREETING; id -u; pwd"],
            "WorkingDir": "/bin",
        }),
    )
}

fn oci_task(image: &str, command: &str, args: &[&str], auth: Option<(&str, &str)>) -> Task {
    Task {
        name: "t".into(),
        driver: "oci".into(),
        config: Some(TaskConfig {
            image: image.into(),
            command: command.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            auth: auth.map(|(u, p)| RegistryAuth { username: u.into(), password: p.into() }),
            ..Default::default()
        }),
        resources: Some(Resources { cpu_mhz: 100, memory_mib: 64, ..Default::default() }),
        kill_timeout_ms: 500,
        ..Default::default()
    }
}

fn alloc(task: Task) -> Allocation {
    Allocation {
        id: shared::alloc_id(),
        name: "j.g[0]".into(),
        task_group: "g".into(),
        desired_status: "run".into(),
        job: Some(Job {
            id: "j".into(),
            name: "j".into(),
            r#type: "batch".into(),
            groups: vec![TaskGroup {
                name: "g".into(),
                count: Some(1),
                tasks: vec![task],
                restart: Some(RestartPolicy { attempts: 0, interval_ms: 60_000, delay_ms: 0, mode: "fail".into() }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One allocation run through the real runners with an `oci` driver over `store`.
struct Run {
    dir: tempfile::TempDir,
    alloc_id: String,
    handle: Option<AllocHandle>,
    rx: mpsc::UnboundedReceiver<AllocClientUpdate>,
    last: Option<AllocClientUpdate>,
}

impl Run {
    fn start(store: &Arc<ImageStore>, task: Task) -> Res<Run> {
        Run::start_alloc(store, alloc(task), BTreeMap::new())
    }

    /// `alloc` on an agent whose configuration offers `host_volumes`.
    fn start_alloc(
        store: &Arc<ImageStore>,
        alloc: Allocation,
        host_volumes: BTreeMap<String, mlp_agent::config_file::HostVolume>,
    ) -> Res<Run> {
        let dir = tempfile::tempdir()?;
        let exec = Arc::new(ExecDriver::new(IsolationSettings {
            supervisor_exe: Some(env!("CARGO_BIN_EXE_mlp-supervise-helper").into()),
            ..Default::default()
        }));
        let mut drivers: BTreeMap<String, Arc<dyn Driver>> = BTreeMap::new();
        drivers.insert("oci".into(), Arc::new(OciDriver::new(exec, store.clone())));
        let env = RunnerEnv {
            alloc_root: dir.path().join("allocs"),
            drivers,
            log_max_file_bytes: 1 << 20,
            log_max_files: 2,
            registry: AllocRegistry::default(),
            gpus: Vec::new(),
            nvml: None,
            gpu_health: tokio::sync::watch::channel(Default::default()).1,
            mps: None,
            network: None,
            node_address: "127.0.0.1".into(),
            node_id: String::new(),
            artifacts: Default::default(),
            tracking: Default::default(),
            host_volumes: Arc::new(host_volumes),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let alloc_id = alloc.id.clone();
        let handle = spawn_alloc_runner(alloc, None, env, tx);
        Ok(Run { dir, alloc_id, handle: Some(handle), rx, last: None })
    }

    async fn terminal(&mut self) -> Res<AllocClientUpdate> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let u = tokio::time::timeout(left, self.rx.recv())
                .await
                .map_err(|_| format!("timed out; last update {:?}", self.last))?
                .ok_or("runner channel closed")?;
            self.last = Some(u.clone());
            if alloc_client::is_terminal(&u.client_status) {
                if let Some(h) = self.handle.take() {
                    tokio::time::timeout(Duration::from_secs(10), h.wait()).await?;
                }
                return Ok(u);
            }
        }
    }

    fn log(&self) -> String {
        let dir = self.dir.path().join("allocs").join(&self.alloc_id).join("t").join("logs");
        let bytes = LogReader::new(&dir, &log_base("t", false), 0, 0).and_then(|mut r| r.read_to_end()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

fn events(u: &AllocClientUpdate) -> Vec<(String, String)> {
    u.task_states["t"].events.iter().map(|e| (e.r#type.clone(), e.message.clone())).collect()
}

fn store_in(dir: &Path, budget: u64) -> Arc<ImageStore> {
    Arc::new(ImageStore::new(dir.join("oci"), settings(budget)))
}

fn layer_dirs(store: &ImageStore) -> Vec<PathBuf> {
    std::fs::read_dir(store.root().join("layers")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_runs_an_image_by_tag_and_by_digest() -> TestResult {
    require();
    let reg = Registry::start(None)?;
    let image = hello_image();
    let digest = reg.push_image("team/hello", "1.0", &image)?;
    let data = tempfile::tempdir()?;
    let store = store_in(data.path(), u64::MAX);

    // By tag: pulled (progress in the events), the image's Cmd, Env and WorkingDir apply.
    let mut run = Run::start(&store, oci_task(&format!("{}/team/hello:1.0", reg.addr), "", &[], None))?;
    let u = run.terminal().await?;
    let evs = events(&u);
    assert_eq!(u.client_status, alloc_client::COMPLETE, "{evs:?}\nlog: {}", run.log());
    assert_eq!(run.log(), "hello from-the-image\n65534\n/bin\n");
    let pulls: Vec<&String> = evs.iter().filter(|(t, _)| t == task_event::DRIVER).map(|(_, m)| m).collect();
    assert!(pulls.iter().any(|m| m.starts_with("Pulling image")), "{evs:?}");
    assert!(pulls.iter().any(|m| m.contains("Layer 1/1") && m.contains("MiB")), "{evs:?}");
    assert!(pulls.iter().any(|m| m.starts_with("Pulled image")), "{evs:?}");

    // By digest, with the command replaced: from the store, no pull.
    let pinned = format!("{}/team/hello@{digest}", reg.addr);
    let mut run = Run::start(&store, oci_task(&pinned, "echo", &["by", "digest"], None))?;
    let u = run.terminal().await?;
    assert_eq!(u.client_status, alloc_client::COMPLETE, "{:?}", events(&u));
    assert_eq!(run.log(), "by digest\n");
    assert!(!events(&u).iter().any(|(t, _)| t == task_event::DRIVER), "pulled again: {:?}", events(&u));
    assert_eq!(store.list().len(), 1);

    // The task's writes land in its own upper directory, never in the shared layers.
    let mut run = Run::start(&store, oci_task(&pinned, "sh", &["-c", "echo x > /bin/new && cat /bin/new"], None))?;
    let u = run.terminal().await?;
    // As nobody, /bin (root's, 0755) is not writable: the image's permissions hold.
    assert_eq!(u.client_status, alloc_client::FAILED, "{:?}", events(&u));
    for layer in layer_dirs(&store) {
        assert!(!layer.join("root/bin/new").exists());
    }

    // A multi-platform index, by tag and pinned by the index's digest: its linux/amd64 image.
    let decoy = TestImage::new(
        vec![(busybox_layer(vec![]), Compression::Gzip)],
        serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["echo", "the arm64 entry"]}),
    );
    let index = reg.push_index("team/multi", "2", &image, &decoy)?;
    for reference in [format!("{}/team/multi:2", reg.addr), format!("{}/team/multi@{index}", reg.addr)] {
        let mut run = Run::start(&store, oci_task(&reference, "", &[], None))?;
        let u = run.terminal().await?;
        assert_eq!(u.client_status, alloc_client::COMPLETE, "{reference}: {:?}", events(&u));
        assert_eq!(run.log(), "hello from-the-image\n65534\n/bin\n", "{reference}");
    }

    // A pinned digest the registry does not have is refused.
    let wrong = format!("{}/team/hello@sha256:{}", reg.addr, "0".repeat(64));
    let mut run = Run::start(&store, oci_task(&wrong, "", &[], None))?;
    let u = run.terminal().await?;
    assert_eq!(u.client_status, alloc_client::FAILED);
    let (kind, message) = events(&u).last().cloned().unwrap_or_default();
    assert_eq!(kind, task_event::DRIVER_FAILURE, "{message}");
    assert!(message.contains("manifest"), "{message}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_a_tampered_blob_is_refused() -> TestResult {
    require();
    let reg = Registry::start(None)?;
    let image = hello_image();
    reg.push_image("team/tampered", "1", &image)?;
    // Same size, other bytes: the registry serves it as it is.
    let file = reg.blob_file(&oci_registry::sha256(&image.layers[0].0));
    let mut bytes = std::fs::read(&file)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, &bytes)?;
    let data = tempfile::tempdir()?;
    let store = store_in(data.path(), u64::MAX);
    let mut run = Run::start(&store, oci_task(&format!("{}/team/tampered:1", reg.addr), "", &[], None))?;
    let u = run.terminal().await?;
    assert_eq!(u.client_status, alloc_client::FAILED, "{:?}", events(&u));
    let (kind, message) = events(&u).last().cloned().unwrap_or_default();
    assert_eq!(kind, task_event::DRIVER_FAILURE);
    assert!(message.to_lowercase().contains("digest"), "{message}");
    assert!(layer_dirs(&store).is_empty(), "a layer of the tampered image was kept");
    assert!(store.list().is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_whiteouts_hide_files_of_lower_layers() -> TestResult {
    require();
    let reg = Registry::start(None)?;
    let base = busybox_layer(vec![
        Entry::Dir("etc"),
        Entry::File("etc/motd", b"old\n".to_vec(), 0o644),
        Entry::Dir("data"),
        Entry::File("data/a", b"a\n".to_vec(), 0o644),
    ]);
    // A zstd layer that deletes /etc/motd and makes /data opaque (only its own b).
    let top = layer_tar(&[
        Entry::Dir("etc"),
        Entry::File("etc/.wh.motd", Vec::new(), 0o644),
        Entry::Dir("data"),
        Entry::File("data/.wh..wh..opq", Vec::new(), 0o644),
        Entry::File("data/b", b"b\n".to_vec(), 0o644),
    ]);
    let image = TestImage::new(
        vec![(base, Compression::Gzip), (top, Compression::Zstd)],
        serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["sh", "-c", "test ! -e /etc/motd && ls /data && echo whiteouts-ok"]}),
    );
    reg.push_image("team/wh", "1", &image)?;
    let data = tempfile::tempdir()?;
    let store = store_in(data.path(), u64::MAX);
    let mut run = Run::start(&store, oci_task(&format!("{}/team/wh:1", reg.addr), "", &[], None))?;
    let u = run.terminal().await?;
    assert_eq!(u.client_status, alloc_client::COMPLETE, "{:?}\nlog: {}", events(&u), run.log());
    assert_eq!(run.log(), "b\nwhiteouts-ok\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_a_registry_with_auth_needs_the_credentials() -> TestResult {
    require();
    let reg = Registry::start(Some(("trainer", "s3cret")))?;
    reg.push_image("team/private", "1", &hello_image())?;
    let image = format!("{}/team/private:1", reg.addr);
    let data = tempfile::tempdir()?;
    let store = store_in(data.path(), u64::MAX);

    let mut run = Run::start(&store, oci_task(&image, "", &[], None))?;
    let u = run.terminal().await?;
    assert_eq!(u.client_status, alloc_client::FAILED);
    let (_, message) = events(&u).last().cloned().unwrap_or_default();
    assert!(message.contains("manifest: Not authorized"), "{message}");

    let mut run = Run::start(&store, oci_task(&image, "", &[], Some(("trainer", "wrong"))))?;
    let u = run.terminal().await?;
    assert_eq!(u.client_status, alloc_client::FAILED);
    let (_, message) = events(&u).last().cloned().unwrap_or_default();
    assert!(!message.contains("wrong"), "the password shows in {message}");

    let mut run = Run::start(&store, oci_task(&image, "", &[], Some(("trainer", "s3cret"))))?;
    let u = run.terminal().await?;
    assert_eq!(u.client_status, alloc_client::COMPLETE, "{:?}", events(&u));
    assert!(run.log().starts_with("hello from-the-image\n"), "{}", run.log());
    assert!(!format!("{:?}", events(&u)).contains("s3cret"));

    // The agent's own credentials for the registry (`--oci-auth-file`), when the job has none.
    let file = data.path().join("auth.json");
    std::fs::write(&file, format!(r#"{{"{}": {{"username": "trainer", "password": "s3cret"}}}}"#, reg.addr))?;
    let credentials = mlp_agent::image::load_credentials(&file)?;
    let other = tempfile::tempdir()?;
    let store = Arc::new(ImageStore::new(other.path().join("oci"), ImageSettings { credentials, ..settings(u64::MAX) }));
    let mut run = Run::start(&store, oci_task(&image, "", &[], None))?;
    let u = run.terminal().await?;
    assert_eq!(u.client_status, alloc_client::COMPLETE, "{:?}", events(&u));
    std::fs::write(&file, r#"{"r:1": {"username": "a:b", "password": "hidden-pw"}}"#)?;
    let err = mlp_agent::image::load_credentials(&file).unwrap_err();
    assert!(err.contains("username") && !err.contains("hidden-pw"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_a_registry_that_goes_away_mid_pull_or_is_down_fails_the_allocation() -> TestResult {
    require();
    let reg = Registry::start(None)?;
    // 8 MiB that do not compress, so the layer blob is the one long response.
    let mut noise = Vec::with_capacity(8 << 20);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while noise.len() < 8 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.extend_from_slice(&x.to_le_bytes());
    }
    let big = layer_tar(&[Entry::File("noise", noise, 0o644)]);
    let image = TestImage::new(vec![(big, Compression::None)], serde_json::json!({"Cmd": ["/noise"]}));
    reg.push_image("team/big", "1", &image)?;
    let proxy = CuttingProxy::start(&reg.addr, 1 << 20)?;
    let data = tempfile::tempdir()?;
    let store = store_in(data.path(), u64::MAX);
    let mut run = Run::start(&store, oci_task(&format!("{}/team/big:1", proxy.addr), "", &[], None))?;
    let u = run.terminal().await?;
    assert!(proxy.cut.load(std::sync::atomic::Ordering::SeqCst), "the proxy never cut the pull");
    assert_eq!(u.client_status, alloc_client::FAILED);
    let (kind, message) = events(&u).last().cloned().unwrap_or_default();
    assert_eq!(kind, task_event::DRIVER_FAILURE);
    assert!(message.contains("pulling") && message.contains("layer") && message.contains("after 3 tries"), "{message}");
    assert!(layer_dirs(&store).is_empty());
    let partial = std::fs::read_dir(store.root().join("blobs/sha256"))?.flatten().count();
    assert_eq!(partial, 0, "a partial blob was left");

    // Nothing listens any more: the first request fails, with the reason.
    let mut run = Run::start(&store, oci_task(&format!("{}/team/big:1", proxy.addr), "", &[], None))?;
    let u = run.terminal().await?;
    assert_eq!(u.client_status, alloc_client::FAILED);
    let (_, message) = events(&u).last().cloned().unwrap_or_default();
    assert!(message.contains("manifest") && message.contains("refused") && message.contains("after 3 tries"), "{message}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_concurrent_pulls_share_the_work_and_gc_keeps_the_budget() -> TestResult {
    oci_registry::require_tools();
    let reg = Registry::start(None)?;
    let a = TestImage::new(
        vec![(busybox_layer(vec![]), Compression::Gzip), (layer_tar(&[Entry::File("a", vec![1; 64 * 1024], 0o644)]), Compression::Gzip)],
        serde_json::json!({"Cmd": ["true"]}),
    );
    let b = TestImage::new(
        vec![(busybox_layer(vec![]), Compression::Gzip), (layer_tar(&[Entry::File("b", vec![2; 64 * 1024], 0o644)]), Compression::Gzip)],
        serde_json::json!({"Cmd": ["true"]}),
    );
    let digest_a = reg.push_image("team/a", "1", &a)?;
    let digest_b = reg.push_image("team/b", "1", &b)?;
    let data = tempfile::tempdir()?;
    // Room for one image (busybox and a 64 KiB layer), not two.
    let busybox_len = std::fs::metadata(oci_registry::BUSYBOX)?.len();
    let store = store_in(data.path(), busybox_len + 100 * 1024);
    let messages = Arc::new(Mutex::new(Vec::<String>::new()));
    let progress = {
        let m = messages.clone();
        move |s: String| m.lock().unwrap().push(s)
    };
    let image_a = format!("{}/team/a:1", reg.addr);
    let (r1, r2) = tokio::join!(store.ensure(&image_a, None, &progress), store.ensure(&image_a, None, &progress));
    let ((img1, hold1), (img2, hold2)) = (r1?, r2?);
    assert_eq!(img1.manifest_digest, digest_a);
    assert_eq!(img1.layers, img2.layers);
    let pulls = messages.lock().unwrap().iter().filter(|m| m.starts_with("Pulling image")).count();
    assert_eq!(pulls, 1, "{:?}", messages.lock().unwrap());
    drop((hold1, hold2));

    // b shares the busybox layer; a, unused and least recently used, goes.
    let (img_b, hold_b) = store.ensure(&format!("{}/team/b:1", reg.addr), None, &progress).await?;
    let list = store.list();
    assert_eq!(list.iter().map(|i| i.manifest_digest.clone()).collect::<Vec<_>>(), vec![digest_b.clone()]);
    assert!(img_b.layers.iter().all(|l| l.is_dir()));
    assert!(!img1.layers[1].exists(), "a's own layer is still there");
    assert!(img1.layers[0].exists(), "the shared layer went");

    // A held image stays even over the budget.
    let (_img_a, _hold_a) = store.ensure(&image_a, None, &progress).await?;
    assert_eq!(store.list().len(), 2, "b was removed while held");
    drop(hold_b);
    let removed = store.gc().await;
    assert_eq!(removed, vec![digest_b]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_an_image_symlink_never_leads_the_root_onto_the_host() -> TestResult {
    require();
    let reg = Registry::start(None)?;
    // /etc in the image points at a host directory: building the root would write the task's
    // /etc/hosts there if the agent followed it before pivot_root.
    let host = tempfile::tempdir()?;
    let target: &'static str = Box::leak(host.path().to_string_lossy().into_owned().into_boxed_str());
    let image = TestImage::new(
        vec![(busybox_layer(vec![Entry::Symlink("etc", target)]), Compression::Gzip)],
        serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["true"]}),
    );
    reg.push_image("team/evil", "1", &image)?;
    let data = tempfile::tempdir()?;
    let store = store_in(data.path(), u64::MAX);
    let mut run = Run::start(&store, oci_task(&format!("{}/team/evil:1", reg.addr), "", &[], None))?;
    let u = run.terminal().await?;
    assert_eq!(u.client_status, alloc_client::FAILED, "{:?}", events(&u));
    let (kind, message) = events(&u).last().cloned().unwrap_or_default();
    assert_eq!(kind, task_event::DRIVER_FAILURE);
    assert!(message.contains("/etc") && message.contains("symlink"), "{message}");
    assert_eq!(std::fs::read_dir(host.path())?.count(), 0, "the agent wrote into the host directory");
    Ok(())
}

/// Host volumes (issue 15 §4) in an image's root: the alloc runner resolves the group's volume
/// through the agent's configuration, the oci driver binds it at the destination (read-only:
/// a write fails); a volume the agent does not have fails the task's start, naming it.
#[tokio::test(flavor = "multi_thread")]
async fn oci_host_volumes_are_bound_into_the_image_root() -> TestResult {
    use mlp_proto::v1::{VolumeMount, VolumeRequest};
    require();
    let reg = Registry::start(None)?;
    reg.push_image("team/vol", "1", &hello_image())?;
    let host = tempfile::tempdir()?;
    std::fs::write(host.path().join("hello.txt"), "from the host volume\n")?;
    let config: BTreeMap<String, mlp_agent::config_file::HostVolume> =
        [("datasets".to_string(), mlp_agent::config_file::HostVolume { path: host.path().to_path_buf(), read_only: true })]
            .into_iter()
            .collect();
    let with_volume = |source: &str| {
        let mut task = oci_task(
            &format!("{}/team/vol:1", reg.addr),
            "sh",
            &["-c", "cat /mnt/data/hello.txt; echo x > /mnt/data/new && echo written || echo refused"],
            None,
        );
        task.volume_mounts = vec![VolumeMount { volume: "data".into(), destination: "/mnt/data".into(), read_only: true }];
        let mut a = alloc(task);
        if let Some(job) = a.job.as_mut() {
            job.groups[0].volumes =
                vec![VolumeRequest { name: "data".into(), r#type: "host".into(), source: source.into(), read_only: true }];
        }
        a
    };
    let data = tempfile::tempdir()?;
    let store = store_in(data.path(), u64::MAX);
    let mut run = Run::start_alloc(&store, with_volume("datasets"), config.clone())?;
    let u = run.terminal().await?;
    assert_eq!(u.client_status, alloc_client::COMPLETE, "{:?}\nlog: {}", events(&u), run.log());
    assert_eq!(run.log(), "from the host volume\nrefused\n");
    assert!(!host.path().join("new").exists(), "the read-only volume was written");

    let mut run = Run::start_alloc(&store, with_volume("gone"), config)?;
    let u = run.terminal().await?;
    assert_eq!(u.client_status, alloc_client::FAILED, "{:?}", events(&u));
    let messages: Vec<String> = events(&u).into_iter().map(|(_, m)| m).collect();
    assert!(
        messages.iter().any(|m| m.contains("host volume unavailable: volume \"data\": this node has no host volume \"gone\"")),
        "{messages:?}"
    );
    Ok(())
}
