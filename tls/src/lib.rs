//! Mutual TLS for mlp (issue 15 §1): every gRPC and HTTP connection between servers, agents and
//! clients is TLS with a certificate on both sides, signed by the cluster's CA, and every RPC is
//! authorized by the *role* of the caller's certificate.
//!
//! * [`Role`]: a certificate's role is a DNS name among its subject alternative names, like
//!   Nomad's `server.<region>.nomad`: `server.mlp`, `agent.mlp`, `client.mlp`. A server
//!   certificate satisfies every role (a server is trusted with the whole cluster anyway).
//! * [`Tls`]: the CA, certificate and key files of one process, loaded into rustls configs (ring
//!   provider only) and reloaded on request ([`Tls::reload`], wired to SIGHUP by the binary);
//!   a failed reload keeps the previous material.
//! * [`net`]: the listener side (accept, TCP_NODELAY, handshake off the accept loop, the peer's
//!   roles as tonic connect info) and the dialer side (a connector that verifies the peer's role
//!   instead of its host name).
//! * [`authz`]: which role each gRPC method needs, applied in one tower layer on every server.
//! * [`gen`]: `mlp tls ca create` and `mlp tls cert create` (rcgen).

pub mod authz;
pub mod gen;
pub mod net;
pub mod secret;

pub use rustls_pki_types as pki_types;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// What a certificate is for, named by a DNS subject alternative name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// `server.mlp`: Raft, forwarding, joins; satisfies every other role too.
    Server,
    /// `agent.mlp`: node registration, heartbeats, allocation streams.
    Agent,
    /// `client.mlp`: the CLI and API users.
    Client,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Server, Role::Agent, Role::Client];

    /// The DNS name that carries the role.
    pub fn dns_name(self) -> &'static str {
        match self {
            Role::Server => "server.mlp",
            Role::Agent => "agent.mlp",
            Role::Client => "client.mlp",
        }
    }

    /// The word used in file names and messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Agent => "agent",
            Role::Client => "client",
        }
    }

    fn server_name(self) -> ServerName<'static> {
        // The three names are valid DNS names; `try_from` on a &'static str cannot fail for them.
        ServerName::try_from(self.dns_name()).unwrap_or_else(|_| ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The roles a (chain-verified) end-entity certificate carries.
pub fn roles_of(cert: &CertificateDer<'_>) -> Vec<Role> {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return Vec::new();
    };
    Role::ALL.into_iter().filter(|r| ee.verify_is_valid_for_subject_name(&r.server_name()).is_ok()).collect()
}

/// Whether a peer with `roles` may act as `needed` (a server may act as anything).
pub fn satisfies(roles: &[Role], needed: Role) -> bool {
    roles.contains(&needed) || roles.contains(&Role::Server)
}

/// Failures loading or using TLS material; each names the file or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("certificate generation: {0}")]
    Generate(String),
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.to_path_buf(), message: message.to_string() }
}

/// The three files of a process's TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s) that peers' certificates must chain to (PEM; several allowed, for
    /// a CA rotation).
    pub ca_file: PathBuf,
    /// This process's certificate (PEM, leaf first, then any intermediates).
    pub cert_file: PathBuf,
    /// Its private key (PEM: PKCS#8, SEC1 or PKCS#1).
    pub key_file: PathBuf,
}

impl TlsFiles {
    /// All three or none: `Ok(None)` when none is given, an error naming the missing ones when
    /// only some are.
    pub fn from_flags(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        names: [&str; 3],
    ) -> Result<Option<TlsFiles>, TlsError> {
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca_file), Some(cert_file), Some(key_file)) => Ok(Some(TlsFiles { ca_file, cert_file, key_file })),
            (ca, cert, key) => {
                let missing: Vec<&str> = [(ca.is_none(), names[0]), (cert.is_none(), names[1]), (key.is_none(), names[2])]
                    .iter()
                    .filter(|(m, _)| *m)
                    .map(|(_, n)| *n)
                    .collect();
                Err(TlsError::Config(format!("mutual TLS needs a CA, a certificate and a key: missing {}", missing.join(", "))))
            }
        }
    }
}

/// The rustls configs built from one reading of the files.
struct Material {
    server: Arc<ServerConfig>,
    /// Dialer configs by the role the peer must hold (`Role::ALL` order).
    clients: [Arc<ClientConfig>; 3],
    roles: Vec<Role>,
    leaf: CertificateDer<'static>,
}

/// A process's TLS identity, reloadable. Cheap to share (`Arc<Tls>`); every new connection uses
/// the material of the latest successful (re)load.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Arc<Material>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).field("roles", &self.roles()).finish()
    }
}

// ring is the project's provider (no aws-lc, no OpenSSL); its deprecation in rustls 0.23.48 is
// about post-quantum key exchange, which ring lacks.
//
// Key exchange prefers X25519: rustls 0.23.48 lists P-384 first for ring, whose P-384 is generic
// big-number code; on the 2-vCPU build machine the P-384 key share and agreement were about a
// tenth of a CLI call's CPU (perf), on both sides of every handshake. X25519 is ring's fastest
// group; P-256 and P-384 stay for peers that offer nothing else.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::kx_group;
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    Arc::new(p)
}

/// ALPN: gRPC and the HTTP API speak HTTP/2; HTTP/1.1 is offered for the HTTP API's clients.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

impl Tls {
    /// Loads the files; fails with what is wrong with which file.
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>, TlsError> {
        let m = load_material(&files)?;
        Ok(Arc::new(Tls { files, current: RwLock::new(Arc::new(m)) }))
    }

    /// Reads the files again. On failure the previous material stays in use and the error says
    /// why; connections already open are not touched either way. Returns the new roles.
    pub fn reload(&self) -> Result<Vec<Role>, TlsError> {
        let m = load_material(&self.files)?;
        let roles = m.roles.clone();
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(m),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(m),
        }
        Ok(roles)
    }

    fn material(&self) -> Arc<Material> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The roles of this process's own certificate.
    pub fn roles(&self) -> Vec<Role> {
        self.material().roles.clone()
    }

    /// This process's own certificate (the leaf).
    pub fn certificate(&self) -> CertificateDer<'static> {
        self.material().leaf.clone()
    }

    /// The listener config: a client certificate chaining to the CA is required.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.material().server.clone()
    }

    /// The dialer config for a peer that must hold `needed` (a server certificate is accepted
    /// for any role): the peer is verified against the CA and the role's name, not against the
    /// address dialled, so certificates need not name the hosts' addresses.
    pub fn client_config(&self, needed: Role) -> Arc<ClientConfig> {
        let m = self.material();
        let i = Role::ALL.iter().position(|r| *r == needed).unwrap_or(0);
        m.clients[i].clone()
    }
}

fn load_material(files: &TlsFiles) -> Result<Material, TlsError> {
    let ca: Vec<CertificateDer<'static>> = read_certs(&files.ca_file)?;
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots.add(c).map_err(|e| file_err(&files.ca_file, format!("not a usable CA certificate: {e}")))?;
    }
    let chain = read_certs(&files.cert_file)?;
    let leaf = chain.first().cloned().ok_or_else(|| file_err(&files.cert_file, "no certificate in the file"))?;
    let key =
        PrivateKeyDer::from_pem_file(&files.key_file).map_err(|e| file_err(&files.key_file, format!("no usable private key: {e}")))?;
    let roots = Arc::new(roots);
    let roles = roles_of(&leaf);

    let provider = provider();
    // The key is parsed and checked against the certificate once, and shared by the server
    // config and the three client configs (parsing an ECDSA key derives its public point: four
    // times per CLI call before).
    let certified =
        Arc::new(CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(|e| {
            file_err(&files.cert_file, format!("certificate and key {} do not fit together: {e}", files.key_file.display()))
        })?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| file_err(&files.ca_file, format!("cannot verify clients with this CA: {e}")))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified.clone())));
    server.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    // No session resumption, either way: every connection presents and checks its certificate
    // (a rotated or removed certificate is never honoured through an earlier session), and
    // the CLI, a new process per call, could not use a ticket anyway. Each handshake then
    // skips deriving, sending and storing two tickets.
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});

    let client = |needed: Role| -> Result<Arc<ClientConfig>, TlsError> {
        let verifier = Arc::new(RoleVerifier::new(roots.clone(), needed)?);
        let mut c = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified.clone())));
        c.alpn_protocols = vec![b"h2".to_vec()];
        c.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(c))
    };
    let clients = [client(Role::ALL[0])?, client(Role::ALL[1])?, client(Role::ALL[2])?];
    Ok(Material { server: Arc::new(server), clients, roles, leaf })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(path, "no CERTIFICATE block in the file"));
    }
    Ok(certs)
}

/// Verifies a server's certificate against the CA and a role's name (a server certificate is
/// good for any role), whatever address was dialled.
#[derive(Debug)]
struct RoleVerifier {
    inner: Arc<WebPkiServerVerifier>,
    needed: Role,
}

impl RoleVerifier {
    fn new(roots: Arc<RootCertStore>, needed: Role) -> Result<Self, TlsError> {
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::Config(format!("cannot verify servers with this CA: {e}")))?;
        Ok(RoleVerifier { inner, needed })
    }
}

impl ServerCertVerifier for RoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut last = None;
        for role in [self.needed, Role::Server] {
            match self.inner.verify_server_cert(end_entity, intermediates, &role.server_name(), ocsp_response, now) {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(rustls::Error::General(format!("the peer's certificate does not hold the {} role", self.needed))))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
