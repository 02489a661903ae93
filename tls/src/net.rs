//! Connections: the listener side ([`incoming`]) and the dialer side ([`channel`]).
//!
//! Both set TCP_NODELAY (without it a response written as two segments, HTTP/2 headers then
//! data, waits for the peer's delayed ACK, 40 ms). With TLS, handshakes run on their own tasks
//! (bounded by [`HANDSHAKE_TIMEOUT`]) so a slow or silent peer never holds up the accept loop;
//! a peer that speaks plaintext to a TLS listener fails its handshake and is dropped.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{roles_of, Role, Tls};

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of an accepted connection; tonic puts it in every request's
/// extensions (`request.extensions().get::<PeerInfo>()`), the HTTP server does the same.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub remote_addr: Option<SocketAddr>,
    /// `None` on a plaintext listener; with TLS, the roles of the peer's verified certificate
    /// (empty for a valid certificate without any role).
    pub roles: Option<Vec<Role>>,
}

/// An accepted connection, plain or TLS.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, PeerInfo),
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            Conn::Plain(s) => PeerInfo { remote_addr: s.peer_addr().ok(), roles: None },
            Conn::Tls(_, info) => info.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }
}

/// The accepted connections of `listener` (TCP_NODELAY set), through TLS when `tls` is given.
/// The accept loop runs on its own task and ends when the stream is dropped.
pub fn incoming(listener: TcpListener, tls: Option<Arc<Tls>>) -> impl Stream<Item = Result<Conn, io::Error>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Conn, io::Error>>(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (stream, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "setting TCP_NODELAY failed");
            }
            match &tls {
                None => {
                    if tx.send(Ok(Conn::Plain(stream))).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => {
                                let roles = s.get_ref().1.peer_certificates().and_then(|c| c.first()).map(roles_of).unwrap_or_default();
                                let info = PeerInfo { remote_addr: Some(remote), roles: Some(roles) };
                                let _ = tx.send(Ok(Conn::Tls(Box::new(s), info))).await;
                            }
                            Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake refused"),
                            Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    tokio_stream_from(rx)
}

fn tokio_stream_from<T: Send + 'static>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Dials TLS to a peer that must hold `role`, presenting this process's certificate.
#[derive(Clone)]
pub struct TlsConnector {
    tls: Arc<Tls>,
    role: Role,
}

impl TlsConnector {
    pub fn new(tls: Arc<Tls>, role: Role) -> Self {
        TlsConnector { tls, role }
    }
}

type ConnectFuture =
    Pin<Box<dyn std::future::Future<Output = Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, io::Error>> + Send>>;

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (tls, role) = (self.tls.clone(), self.role);
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("address {uri} has no host")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
            Ok(TokioIo::new(connect(&host, port, &tls, role).await?))
        })
    }
}

/// A TLS connection to `host:port`, whose certificate must hold `role`, presenting this
/// process's certificate (TCP_NODELAY set).
pub async fn connect(host: &str, port: u16, tls: &Tls, role: Role) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    // The name sent (SNI) is the role's; the verifier checks the role, not the address.
    let name =
        rustls_pki_types::ServerName::try_from(role.dns_name()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    tokio_rustls::TlsConnector::from(tls.client_config(role)).connect(name, tcp).await
}

/// The certificate the peer at `host:port` presents now (operators' and tests' check that a
/// rotation took effect).
pub async fn peer_certificate(host: &str, port: u16, tls: &Tls, role: Role) -> io::Result<rustls_pki_types::CertificateDer<'static>> {
    let s = connect(host, port, tls, role).await?;
    s.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned())
        .ok_or_else(|| io::Error::other("the peer presented no certificate"))
}

/// A lazily connecting channel over `endpoint`: TLS to a peer holding `role` when `tls` is
/// given, plaintext otherwise (the endpoint's own settings, TCP_NODELAY set).
pub fn channel_lazy(endpoint: Endpoint, tls: Option<&Arc<Tls>>, role: Role) -> Channel {
    match tls {
        Some(tls) => endpoint.connect_with_connector_lazy(TlsConnector::new(tls.clone(), role)),
        None => endpoint.tcp_nodelay(true).connect_lazy(),
    }
}

/// Like [`channel_lazy`], connecting now.
pub async fn channel(endpoint: Endpoint, tls: Option<&Arc<Tls>>, role: Role) -> Result<Channel, tonic::transport::Error> {
    match tls {
        Some(tls) => endpoint.connect_with_connector(TlsConnector::new(tls.clone(), role)).await,
        None => endpoint.tcp_nodelay(true).connect().await,
    }
}

/// The URI scheme to dial: `https` with TLS (for readable errors and logs), else `http`. An
/// address that carries a scheme keeps it.
pub fn uri_for(addr: &str, tls: bool) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}
