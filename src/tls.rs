//! Mutual TLS in the binary (issue 15 §1): `mlp tls ca create` / `mlp tls cert create`, the
//! TLS identity of the CLI (flags, else `MLP_CACERT`, `MLP_CLIENT_CERT`, `MLP_CLIENT_KEY`) and
//! of the daemons (flags, else their config file's `tls` block), and the SIGHUP reload of the daemons' certificates.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use mlp_agent::config_file::{NamedFile, TlsSection};
use mlp_tls::{Role, Tls, TlsFiles};

use crate::cli::{Conn, TlsCaCommand, TlsCertCommand, TlsCommand};

/// `mlp tls …`: writes PEM files into the current directory.
pub fn command(cmd: TlsCommand) -> anyhow::Result<ExitCode> {
    let dir = std::env::current_dir().context("reading the current directory")?;
    match cmd {
        TlsCommand::Ca(TlsCaCommand::Create { days, common_name }) => {
            let (cert_path, key_path) = mlp_tls::gen::ca_paths(&dir);
            for p in [&cert_path, &key_path] {
                if p.exists() {
                    anyhow::bail!("{} already exists; remove it or work in another directory", p.display());
                }
            }
            let (cert, key) = mlp_tls::gen::ca(&common_name, days)?;
            mlp_tls::gen::write_new(&cert_path, &cert, false)?;
            mlp_tls::gen::write_new(&key_path, &key, true)?;
            println!("==> CA certificate written to {}", file_name(&cert_path));
            println!("==> CA key written to {} (keep it private: it signs every certificate)", file_name(&key_path));
        }
        TlsCommand::Cert(TlsCertCommand::Create { server, agent, client, ca, key, days, additional_dnsname, additional_ipaddress }) => {
            let role = match (server, agent, client) {
                (true, _, _) => Role::Server,
                (_, true, _) => Role::Agent,
                (_, _, true) => Role::Client,
                _ => anyhow::bail!("name the certificate's role: --server, --agent or --client"),
            };
            let ca_pem = std::fs::read_to_string(&ca).with_context(|| format!("reading the CA certificate {}", ca.display()))?;
            let ca_key = std::fs::read_to_string(&key).with_context(|| format!("reading the CA key {}", key.display()))?;
            let req = mlp_tls::gen::CertRequest { role, days, dns_names: additional_dnsname, ip_addresses: additional_ipaddress };
            let (cert, cert_key) = mlp_tls::gen::cert(&ca_pem, &ca_key, &req)?;
            let (cert_path, key_path) = mlp_tls::gen::free_cert_paths(&dir, role);
            mlp_tls::gen::write_new(&cert_path, &cert, false)?;
            mlp_tls::gen::write_new(&key_path, &cert_key, true)?;
            println!("==> {role} certificate ({}) written to {}", role.dns_name(), file_name(&cert_path));
            println!("==> {role} key written to {}", file_name(&key_path));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn file_name(p: &std::path::Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
}

/// Nomad spells these flags with one dash (`-server`, `-additional-dnsname`): under `mlp tls`,
/// a single-dash word of more than one letter is taken as its double-dash flag.
pub fn nomad_style_args(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let is_tls = args.get(1).and_then(|a| a.to_str()) == Some("tls");
    if !is_tls {
        return args;
    }
    args.into_iter()
        .map(|a| match a.to_str() {
            Some(s) if s.len() > 2 && s.starts_with('-') && !s.starts_with("--") && s[1..2].chars().all(|c| c.is_ascii_alphabetic()) => {
                format!("-{s}").into()
            }
            _ => a,
        })
        .collect()
}

/// The CLI's TLS identity, set once before any connection.
static CLI_TLS: OnceLock<Option<Arc<Tls>>> = OnceLock::new();

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// Loads the CLI's identity from the flags, else the environment; an `https://` address without
/// one is an error that says what to set.
pub fn init_cli(conn: &Conn) -> anyhow::Result<()> {
    let files = TlsFiles::from_flags(
        conn.ca_file.clone().or_else(|| env_path("MLP_CACERT")),
        conn.cert_file.clone().or_else(|| env_path("MLP_CLIENT_CERT")),
        conn.key_file.clone().or_else(|| env_path("MLP_CLIENT_KEY")),
        ["--ca-file (MLP_CACERT)", "--cert-file (MLP_CLIENT_CERT)", "--key-file (MLP_CLIENT_KEY)"],
    )?;
    let tls = match files {
        Some(f) => Some(Tls::load(f)?),
        None if conn.address.split(',').any(|a| a.trim().starts_with("https://")) => anyhow::bail!(
            "{} is an https:// address: mutual TLS needs --ca-file (MLP_CACERT), --cert-file (MLP_CLIENT_CERT) and --key-file (MLP_CLIENT_KEY)",
            conn.address
        ),
        None => None,
    };
    let _ = CLI_TLS.set(tls);
    Ok(())
}

/// The CLI's TLS identity (None: plaintext).
pub fn cli() -> Option<&'static Arc<Tls>> {
    CLI_TLS.get().and_then(Option::as_ref)
}

/// A daemon's identity from its flags, else its config file's `tls` block, field by field (no
/// environment: MLP_CLIENT_CERT is the CLI's), checked to hold `role`. A problem with a file
/// the config file named says where it was named (`FILE:LINE:COLUMN: tls.cert_file`).
pub fn daemon(conn: &Conn, role: Role, what: &str, file: Option<&TlsSection>) -> anyhow::Result<Option<Arc<Tls>>> {
    // Each field: the flag's path and name, else the file's path and where the file named it.
    let pick = |flag: &Option<PathBuf>, name: &str, named: Option<&NamedFile>| -> (Option<PathBuf>, String) {
        match (flag, named) {
            (Some(p), _) => (Some(p.clone()), name.to_string()),
            (None, Some(n)) => (Some(n.path.clone()), n.origin.clone()),
            (None, None) => (None, name.to_string()),
        }
    };
    let (ca, ca_name) = pick(&conn.ca_file, "--ca-file", file.map(|f| &f.ca_file));
    let (cert, cert_name) = pick(&conn.cert_file, "--cert-file", file.map(|f| &f.cert_file));
    let (key, key_name) = pick(&conn.key_file, "--key-file", file.map(|f| &f.key_file));
    let Some(files) = TlsFiles::from_flags(ca, cert, key, [ca_name.as_str(), cert_name.as_str(), key_name.as_str()])? else {
        return Ok(None);
    };
    let names = [(files.ca_file.clone(), ca_name), (files.cert_file.clone(), cert_name.clone()), (files.key_file.clone(), key_name)];
    let cert = files.cert_file.clone();
    let tls = Tls::load(files).map_err(|e| match &e {
        // The same message as with the flags; a file from the config file also says where.
        mlp_tls::TlsError::File { path, .. } => match names.iter().find(|(p, n)| p == path && !n.starts_with("--")) {
            Some((_, origin)) => anyhow::anyhow!("{origin}: {e}"),
            None => anyhow::Error::new(e),
        },
        _ => anyhow::Error::new(e),
    })?;
    let roles = tls.roles();
    if !mlp_tls::satisfies(&roles, role) {
        let held = if roles.is_empty() { "none".to_string() } else { roles.iter().map(|r| r.dns_name()).collect::<Vec<_>>().join(", ") };
        anyhow::bail!(
            "{cert_name} {}: {what} needs a certificate with the {role} role ({}); this one has: {held} (mlp tls cert create --{role})",
            cert.display(),
            role.dns_name()
        );
    }
    Ok(Some(tls))
}

/// Reloads `identities` from their files on every SIGHUP, for as long as the process runs. A
/// reload that fails (a half-written file, a key that does not fit) keeps the previous
/// certificates and says why.
pub fn reload_on_sighup(identities: Vec<Arc<Tls>>) -> anyhow::Result<()> {
    if identities.is_empty() {
        return Ok(());
    }
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            for tls in &identities {
                match tls.reload() {
                    Ok(roles) => tracing::info!(cert = %tls.files().cert_file.display(), roles = ?roles, "TLS certificates reloaded"),
                    Err(e) => tracing::error!(error = %e, "TLS reload failed; the previous certificates stay in use"),
                }
            }
        }
    });
    Ok(())
}
