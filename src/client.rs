//! gRPC clients for the CLI, connected to a server given by `--address`.
//!
//! `--address` may list several servers (comma separated): the CLI connects to the first one
//! that answers. Any server accepts any request (followers forward to the leader), so which
//! one it reaches only matters for `--stale` reads.

use anyhow::Context;
use mlp_proto::v1::{
    alloc_service_client::AllocServiceClient, cluster_service_client::ClusterServiceClient, eval_service_client::EvalServiceClient,
    event_service_client::EventServiceClient, job_service_client::JobServiceClient, node_service_client::NodeServiceClient,
    system_service_client::SystemServiceClient,
};
use tonic::transport::Endpoint;

/// The connection every client uses: the server's channel, with the ACL token of `MLP_TOKEN`
/// (if set) in each request's metadata (`x-mlp-token`).
pub type Channel = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, TokenInterceptor>;

/// Puts the ACL token into every request.
#[derive(Clone)]
pub struct TokenInterceptor(Option<tonic::metadata::AsciiMetadataValue>);

impl TokenInterceptor {
    /// The token of `MLP_TOKEN`; empty or unset: none.
    pub fn from_env() -> anyhow::Result<TokenInterceptor> {
        match std::env::var("MLP_TOKEN") {
            Ok(t) if !t.trim().is_empty() => {
                let v = t.trim().parse().map_err(|_| anyhow::anyhow!("MLP_TOKEN is not a valid token (printable ASCII only)"))?;
                Ok(TokenInterceptor(Some(v)))
            }
            _ => Ok(TokenInterceptor(None)),
        }
    }
}

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert(mlp_server::acl::TOKEN_HEADER, t.clone());
        }
        Ok(req)
    }
}

/// HTTP/2 pings on the CLI's connection, and how long an unanswered one may take.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Largest message the CLI accepts.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// One connection, one client per service (cheap to clone: they share the connection).
#[derive(Clone)]
pub struct Clients {
    pub jobs: JobServiceClient<Channel>,
    pub allocs: AllocServiceClient<Channel>,
    pub nodes: NodeServiceClient<Channel>,
    pub evals: EvalServiceClient<Channel>,
    pub cluster: ClusterServiceClient<Channel>,
    pub system: SystemServiceClient<Channel>,
    pub events: EventServiceClient<Channel>,
    pub services: mlp_proto::v1::service_service_client::ServiceServiceClient<Channel>,
    pub acl: mlp_proto::v1::acl_service_client::AclServiceClient<Channel>,
    pub tracking: mlp_proto::v1::tracking_service_client::TrackingServiceClient<Channel>,
    pub deployments: mlp_proto::v1::deployment_service_client::DeploymentServiceClient<Channel>,
    pub namespaces: mlp_proto::v1::namespace_service_client::NamespaceServiceClient<Channel>,
}

pub fn endpoint_uri(address: &str) -> String {
    mlp_tls::net::uri_for(address, crate::tls::cli().is_some())
}

/// How long an unanswered ping may take on a long operator call (`operator snapshot save` and
/// `restore`): the server may spend seconds at a time writing a large state or millions of
/// metric points, and failing over such a call gains nothing.
const PATIENT_KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Connects to the first server of the comma-separated `addresses` that accepts a connection.
pub async fn connect(addresses: &str) -> anyhow::Result<Clients> {
    connect_with(addresses, KEEPALIVE_TIMEOUT).await
}

/// [`connect`] for a long operator call: pings may go unanswered for a minute.
pub async fn connect_patient(addresses: &str) -> anyhow::Result<Clients> {
    connect_with(addresses, PATIENT_KEEPALIVE_TIMEOUT).await
}

async fn connect_with(addresses: &str, keepalive_timeout: std::time::Duration) -> anyhow::Result<Clients> {
    let list: Vec<&str> = addresses.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
    if list.is_empty() {
        anyhow::bail!("--address is empty (set --address or MLP_ADDR)");
    }
    let mut last_err = None;
    for address in &list {
        match connect_one(address, keepalive_timeout).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::debug!(%address, error = %e, "server unreachable; trying the next one");
                last_err = Some(e);
            }
        }
    }
    match last_err {
        Some(e) if list.len() == 1 => Err(e),
        Some(e) => Err(e.context(format!("none of the {} servers in --address answered", list.len()))),
        None => anyhow::bail!("no server address given"),
    }
}

async fn connect_one(address: &str, keepalive_timeout: std::time::Duration) -> anyhow::Result<Clients> {
    let uri = endpoint_uri(address);
    let endpoint = Endpoint::from_shared(uri.clone())
        .with_context(|| format!("invalid --address {address:?}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        // A server that stops answering (frozen, or its host gone) fails the call within
        // about 3 s instead of hanging it, so the request fails over to the next server; a
        // live server answers pings even while it holds a write waiting for a new leader.
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(keepalive_timeout)
        .keep_alive_while_idle(true);
    // With TLS the server must hold the server role (mlp_tls::net); plaintext otherwise.
    let channel = mlp_tls::net::channel(endpoint, crate::tls::cli(), mlp_tls::Role::Server)
        .await
        .map_err(|e| anyhow::anyhow!("{}", error_chain(&e)))
        .with_context(|| format!("cannot reach the mlp server at {uri} (set --address or MLP_ADDR)"))?;
    let channel = tonic::service::interceptor::InterceptedService::new(channel, TokenInterceptor::from_env()?);
    Ok(Clients {
        acl: mlp_proto::v1::acl_service_client::AclServiceClient::new(channel.clone()),
        deployments: mlp_proto::v1::deployment_service_client::DeploymentServiceClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        namespaces: mlp_proto::v1::namespace_service_client::NamespaceServiceClient::new(channel.clone()),
        tracking: mlp_proto::v1::tracking_service_client::TrackingServiceClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        jobs: JobServiceClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        allocs: AllocServiceClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        nodes: NodeServiceClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        evals: EvalServiceClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        cluster: ClusterServiceClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        system: SystemServiceClient::new(channel.clone()),
        events: EventServiceClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        services: mlp_proto::v1::service_service_client::ServiceServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES),
    })
}

/// An error and its sources, `: `-joined (tonic's transport error alone says only "transport
/// error", the TLS reason is in its sources).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// Turns a gRPC status into an error that reads well on a terminal.
pub fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

// ---- alloc exec ----

/// What `mlp alloc exec` runs.
pub struct ExecArgs {
    pub alloc_id: String,
    pub task: String,
    pub command: Vec<String>,
    pub tty: bool,
    pub interactive: bool,
}

/// Stdin bytes per request (the servers accept up to 64 KiB).
const EXEC_STDIN_CHUNK: usize = 32 * 1024;

/// Runs a command in a task: the first request names it, then stdin (a thread reads it) and
/// terminal resizes (SIGWINCH) follow; stdout/stderr are written as they come. The CLI exits
/// with the command's exit code (128 + signal when a signal killed it).
pub async fn exec(c: &mut Clients, args: ExecArgs) -> anyhow::Result<std::process::ExitCode> {
    use mlp_proto::v1::{ExecRequest, ExecStart};
    use std::io::{Read, Write};

    let (tx, rx) = tokio::sync::mpsc::channel::<ExecRequest>(16);
    let start = ExecStart {
        alloc_id: args.alloc_id,
        task: args.task,
        command: args.command,
        tty: args.tty,
        size: if args.tty { terminal::size() } else { None },
    };
    tx.send(ExecRequest { start: Some(start), ..Default::default() }).await?;
    // Raw mode while the session runs; the guard restores the terminal on every return path.
    let _raw = if args.tty { terminal::RawMode::enter(0) } else { None };
    if args.interactive {
        let stdin_tx = tx.clone();
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; EXEC_STDIN_CHUNK];
            loop {
                let msg = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => ExecRequest { stdin_eof: true, ..Default::default() },
                    Ok(n) => ExecRequest { stdin: buf[..n].to_vec(), ..Default::default() },
                };
                let eof = msg.stdin_eof;
                if stdin_tx.blocking_send(msg).is_err() || eof {
                    return;
                }
            }
        });
    } else {
        tx.send(ExecRequest { stdin_eof: true, ..Default::default() }).await?;
    }
    if args.tty {
        if let Ok(mut winch) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()) {
            let resize_tx = tx.clone();
            tokio::spawn(async move {
                while winch.recv().await.is_some() {
                    if let Some(size) = terminal::size() {
                        if resize_tx.send(ExecRequest { resize: Some(size), ..Default::default() }).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    }
    drop(tx);
    let mut stream = c.allocs.exec(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map_err(status_err)?.into_inner();
    let mut exit = None;
    while let Some(m) = stream.message().await.map_err(status_err)? {
        if !m.stdout.is_empty() {
            let mut out = std::io::stdout().lock();
            out.write_all(&m.stdout)?;
            out.flush()?;
        }
        if !m.stderr.is_empty() {
            let mut err = std::io::stderr().lock();
            err.write_all(&m.stderr)?;
            err.flush()?;
        }
        if let Some(e) = m.exit {
            exit = Some(e);
        }
    }
    let e = exit.context("the exec session ended without the command's exit status")?;
    let code = if e.signal != 0 { 128 + e.signal } else { e.code };
    Ok(std::process::ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)))
}

/// The local terminal: its size and raw mode.
#[allow(unsafe_code)]
mod terminal {
    use mlp_proto::v1::TerminalSize;

    /// The size of the terminal on stdout (or stdin); None when neither is one.
    pub fn size() -> Option<TerminalSize> {
        for fd in [1, 0] {
            let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
            // SAFETY: TIOCGWINSZ writes one winsize into the pointer, which lives across the call.
            if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
                return Some(TerminalSize { rows: u32::from(ws.ws_row), cols: u32::from(ws.ws_col) });
            }
        }
        None
    }

    /// A terminal in raw mode; dropping it restores the saved settings.
    pub struct RawMode {
        fd: i32,
        saved: libc::termios,
    }

    impl RawMode {
        /// Puts `fd` in raw mode when it is a terminal.
        pub fn enter(fd: i32) -> Option<RawMode> {
            // SAFETY: isatty only inspects the descriptor.
            if unsafe { libc::isatty(fd) } != 1 {
                return None;
            }
            // SAFETY: termios is plain data; all-zero is a valid value that tcgetattr overwrites.
            let mut saved: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: tcgetattr writes one termios into the pointer, which lives across the call.
            if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
                return None;
            }
            let mut raw = saved;
            // SAFETY: cfmakeraw only edits the struct it is given; tcsetattr reads it.
            let ok = unsafe {
                libc::cfmakeraw(&mut raw);
                libc::tcsetattr(fd, libc::TCSANOW, &raw) == 0
            };
            ok.then_some(RawMode { fd, saved })
        }
    }

    impl Drop for RawMode {
        fn drop(&mut self) {
            // SAFETY: restores settings read from the same descriptor by tcgetattr.
            unsafe {
                libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved);
            }
        }
    }
}

/// How long the CLI keeps retrying a request across a leader change or unreachable servers.
const RETRY_WINDOW: std::time::Duration = std::time::Duration::from_secs(30);
/// First pause after a full pass over `--address` found no server able to answer; doubles up to
/// [`RETRY_PAUSE_MAX`]. Short, because a follower already holds a write until a new leader is
/// elected: a pass only fails when the servers tried are down or answered "no leader".
const RETRY_PAUSE_MIN: std::time::Duration = std::time::Duration::from_millis(25);
const RETRY_PAUSE_MAX: std::time::Duration = std::time::Duration::from_millis(400);

/// Whether a request that failed with `s` may be sent again, to this or another server: the
/// server could not take it (no leader, shutting down, unreachable, connection lost mid-call).
fn retryable(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
}

/// Runs one request against the servers of `addresses`, failing over by itself: a server that
/// cannot be reached, is shutting down, or has no leader (gRPC unavailable / unknown transport
/// errors) is skipped for the next one, round robin, with a short growing pause after each full
/// pass, for up to [`RETRY_WINDOW`]. Callers only send requests that are safe to repeat (reads;
/// registrations, which are idempotent by job id; stops). With one address only its answers are
/// retried (it may be a follower waiting for a new leader); a connection error fails at once.
/// Returns the clients of the server that answered, for what follows.
pub async fn with_failover<T, F, Fut>(addresses: &str, mut op: F) -> anyhow::Result<(Clients, T)>
where
    F: FnMut(Clients) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let list: Vec<&str> = addresses.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
    if list.is_empty() {
        anyhow::bail!("--address is empty (set --address or MLP_ADDR)");
    }
    let deadline = std::time::Instant::now() + RETRY_WINDOW;
    let mut pause = RETRY_PAUSE_MIN;
    let mut attempt = 0usize;
    loop {
        let address = list[attempt % list.len()];
        attempt += 1;
        let last = std::time::Instant::now() >= deadline;
        match connect_one(address, KEEPALIVE_TIMEOUT).await {
            Ok(c) => match op(c.clone()).await {
                Ok(v) => return Ok((c, v)),
                Err(s) if !last && retryable(&s) => {
                    tracing::debug!(%address, error = %s.message(), "server could not take the request; trying again");
                }
                Err(s) => return Err(status_err(s)),
            },
            Err(e) if list.len() == 1 => return Err(e),
            Err(e) if last => return Err(e.context(format!("none of the {} servers in --address answered", list.len()))),
            Err(e) => tracing::debug!(%address, error = %e, "server unreachable; trying the next one"),
        }
        if attempt.is_multiple_of(list.len()) {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_PAUSE_MAX);
        }
    }
}

/// Registers a job through the servers of `addresses` with [`with_failover`]. Registration is
/// idempotent (an unchanged spec keeps its version), so a retry after a lost answer is safe.
pub async fn register_with_failover(
    addresses: &str,
    req: mlp_proto::v1::RegisterJobRequest,
) -> anyhow::Result<(Clients, mlp_proto::v1::RegisterJobResponse)> {
    with_failover(addresses, |mut c| {
        let req = req.clone();
        async move { c.jobs.register(req).await.map(tonic::Response::into_inner) }
    })
    .await
}
