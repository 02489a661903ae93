//! `mlp tls ca create` and `mlp tls cert create`: a cluster CA and certificates signed by it,
//! written as PEM files (Nomad's shape: `mlp-ca.pem` / `mlp-ca-key.pem`, then
//! `mlp-server.pem` / `mlp-server-key.pem`, `mlp-agent…`, `mlp-client…`, numbered
//! `mlp-server-1.pem`… when the name is taken). Keys are ECDSA P-256, written 0600.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

use crate::{Role, TlsError};

/// Default lifetime of a CA (5 years) and of a certificate (1 year), in days.
pub const CA_DAYS: u32 = 1825;
pub const CERT_DAYS: u32 = 365;

fn gen_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Generate(e.to_string())
}

fn validity(params: &mut CertificateParams, days: u32) -> Result<(), TlsError> {
    if days == 0 || days > 36500 {
        return Err(TlsError::Generate(format!("days must be between 1 and 36500, got {days}")));
    }
    let now = time::OffsetDateTime::now_utc();
    // A minute of slack for clocks slightly behind the issuer's.
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    Ok(())
}

/// A fresh CA: (certificate PEM, key PEM).
pub fn ca(common_name: &str, days: u32) -> Result<(String, String), TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "mlp");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days)?;
    let key = KeyPair::generate().map_err(gen_err)?;
    let cert = params.self_signed(&key).map_err(gen_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// What a certificate is for and where it may be reached.
#[derive(Debug, Clone)]
pub struct CertRequest {
    pub role: Role,
    pub days: u32,
    /// Extra DNS names (`-additional-dnsname`).
    pub dns_names: Vec<String>,
    /// Extra IP addresses (`-additional-ipaddress`).
    pub ip_addresses: Vec<IpAddr>,
}

/// A certificate for `req` signed by the CA: (certificate PEM, key PEM). Its names: the role's
/// (`server.mlp`…), `localhost`, `127.0.0.1`, `::1`, and the extra ones.
pub fn cert(ca_pem: &str, ca_key_pem: &str, req: &CertRequest) -> Result<(String, String), TlsError> {
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(|e| TlsError::Generate(format!("the CA key: {e}")))?;
    let issuer = Issuer::from_ca_cert_pem(ca_pem, ca_key).map_err(|e| TlsError::Generate(format!("the CA certificate: {e}")))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, req.role.dns_name());
    dn.push(DnType::OrganizationName, "mlp");
    params.distinguished_name = dn;
    let mut sans = vec![req.role.dns_name().to_string(), "localhost".to_string()];
    for d in &req.dns_names {
        let d = d.trim();
        if d.is_empty() {
            return Err(TlsError::Generate("an additional DNS name is empty".into()));
        }
        if Role::ALL.iter().any(|r| r.dns_name().eq_ignore_ascii_case(d)) && !d.eq_ignore_ascii_case(req.role.dns_name()) {
            return Err(TlsError::Generate(format!("additional DNS name {d:?} is another role's name")));
        }
        sans.push(d.to_string());
    }
    let mut san_types = Vec::new();
    for s in sans {
        let name = s.clone().try_into().map_err(|e| TlsError::Generate(format!("DNS name {s:?}: {e}")))?;
        san_types.push(SanType::DnsName(name));
    }
    let mut ips: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from(std::net::Ipv6Addr::LOCALHOST)];
    ips.extend(req.ip_addresses.iter().copied());
    ips.dedup();
    san_types.extend(ips.into_iter().map(SanType::IpAddress));
    params.subject_alt_names = san_types;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    // Every role both serves and dials (a server dials peers and agents, an agent serves logs).
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, req.days)?;
    let key = KeyPair::generate().map_err(gen_err)?;
    let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The CA's file names in a directory.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("mlp-ca.pem"), dir.join("mlp-ca-key.pem"))
}

/// The first free pair of names for a role's certificate in `dir`: `mlp-<role>.pem` and
/// `mlp-<role>-key.pem`, else `mlp-<role>-1.pem`…
pub fn free_cert_paths(dir: &Path, role: Role) -> (PathBuf, PathBuf) {
    let mut n = 0u32;
    loop {
        let stem = if n == 0 { format!("mlp-{}", role.name()) } else { format!("mlp-{}-{n}", role.name()) };
        let (c, k) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}-key.pem")));
        if !c.exists() && !k.exists() {
            return (c, k);
        }
        n += 1;
    }
}

/// Writes a new file (refusing to overwrite one); `private` files get mode 0600.
pub fn write_new(path: &Path, contents: &str, private: bool) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| TlsError::File { path: path.to_path_buf(), message: format!("cannot create: {e}") })?;
    f.write_all(contents.as_bytes()).map_err(|e| TlsError::File { path: path.to_path_buf(), message: format!("cannot write: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{roles_of, Tls, TlsFiles};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;

    #[test]
    fn certificates_carry_their_role_and_load() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let (ca_pem, ca_key) = ca("mlp test CA", 30)?;
        let (ca_path, _) = ca_paths(dir.path());
        write_new(&ca_path, &ca_pem, false)?;
        for role in Role::ALL {
            let (c, k) =
                cert(&ca_pem, &ca_key, &CertRequest { role, days: 10, dns_names: vec!["node1.example".into()], ip_addresses: vec![] })?;
            let der = CertificateDer::from_pem_slice(c.as_bytes())?;
            assert_eq!(roles_of(&der), vec![role]);
            let (cp, kp) = free_cert_paths(dir.path(), role);
            write_new(&cp, &c, false)?;
            write_new(&kp, &k, true)?;
            let tls = Tls::load(TlsFiles { ca_file: ca_path.clone(), cert_file: cp, key_file: kp })?;
            assert_eq!(tls.roles(), vec![role]);
        }
        // Names are taken now: the next server certificate gets a number.
        assert!(free_cert_paths(dir.path(), Role::Server).0.ends_with("mlp-server-1.pem"));
        Ok(())
    }

    /// A server and a client loaded from `mlp tls` files complete a handshake in memory over
    /// X25519 (not the provider's default P-384, several times slower in ring), and a key that
    /// does not belong to its certificate is refused at load.
    #[test]
    fn handshakes_use_x25519_never_resume_and_mismatched_keys_are_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let (ca_pem, ca_key) = ca("mlp test CA", 30)?;
        let (ca_path, _) = ca_paths(dir.path());
        write_new(&ca_path, &ca_pem, false)?;
        let mut files = Vec::new();
        for role in [Role::Server, Role::Client] {
            let (c, k) = cert(&ca_pem, &ca_key, &CertRequest { role, days: 10, dns_names: vec![], ip_addresses: vec![] })?;
            let (cp, kp) = free_cert_paths(dir.path(), role);
            write_new(&cp, &c, false)?;
            write_new(&kp, &k, true)?;
            files.push(TlsFiles { ca_file: ca_path.clone(), cert_file: cp, key_file: kp });
        }
        let server = Tls::load(files[0].clone())?;
        let client = Tls::load(files[1].clone())?;
        let name = rustls_pki_types::ServerName::try_from("server.mlp")?.to_owned();
        let handshake = || -> Result<(rustls::ClientConnection, rustls::ServerConnection), Box<dyn std::error::Error>> {
            let mut c = rustls::ClientConnection::new(client.client_config(Role::Server), name.clone())?;
            let mut s = rustls::ServerConnection::new(server.server_config())?;
            // Until both are done and nothing is left to send (tickets, if any, come after).
            for _ in 0..20 {
                let mut buf = Vec::new();
                while c.wants_write() {
                    c.write_tls(&mut buf)?;
                }
                s.read_tls(&mut buf.as_slice())?;
                s.process_new_packets()?;
                let mut back = Vec::new();
                while s.wants_write() {
                    s.write_tls(&mut back)?;
                }
                c.read_tls(&mut back.as_slice())?;
                c.process_new_packets()?;
                if !c.is_handshaking() && !s.is_handshaking() && buf.is_empty() && back.is_empty() {
                    break;
                }
            }
            assert!(!c.is_handshaking() && !s.is_handshaking(), "the handshake did not finish");
            Ok((c, s))
        };
        let (c, s) = handshake()?;
        let group = c.negotiated_key_exchange_group().map(|g| g.name());
        assert_eq!(group, Some(rustls::NamedGroup::X25519));
        assert_eq!(s.negotiated_key_exchange_group().map(|g| g.name()), Some(rustls::NamedGroup::X25519));
        // No resumption: a second connection with the same configs is a full handshake in which
        // the client presents its certificate again.
        let (c2, s2) = handshake()?;
        assert_eq!(c2.handshake_kind(), Some(rustls::HandshakeKind::Full));
        assert_eq!(s2.handshake_kind(), Some(rustls::HandshakeKind::Full));
        assert_eq!(s2.peer_certificates().map(|p| p.len()), Some(1));
        // The client's certificate with the server's key.
        let crossed = TlsFiles { key_file: files[0].key_file.clone(), ..files[1].clone() };
        let e = Tls::load(crossed).err().ok_or("a key of another certificate was accepted")?;
        assert!(e.to_string().contains("do not fit together"), "{e}");
        Ok(())
    }

    #[test]
    fn a_role_name_cannot_be_added_to_another_role() -> Result<(), Box<dyn std::error::Error>> {
        let (ca_pem, ca_key) = ca("mlp test CA", 30)?;
        let r = cert(
            &ca_pem,
            &ca_key,
            &CertRequest { role: Role::Client, days: 10, dns_names: vec!["server.mlp".into()], ip_addresses: vec![] },
        );
        assert!(r.is_err());
        Ok(())
    }

    #[test]
    fn broken_files_are_named() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "not pem")?;
        let e = Tls::load(TlsFiles { ca_file: bad.clone(), cert_file: bad.clone(), key_file: bad.clone() })
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("bad.pem"), "{e}");
        Ok(())
    }
}
