//! `mlp acl ...`: bootstrap, policies and tokens (issue 15 §2; docs/acl.md).

use std::process::ExitCode;

use anyhow::Context;
use mlp_proto::v1::*;

use crate::cli::{AclCommand, AclPolicyCommand, AclTokenCommand};
use crate::client::{connect, status_err};
use crate::output::{print_json, Table};

/// Nomad spells these flags with one dash (`-policy`, `-ttl`); clap wants two. Rewrites them for
/// `mlp acl ...` only, before clap sees the arguments.
pub fn nomad_flags(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    // `mlp [--address A] acl ...`: the verb may follow global flags and their values.
    let is_acl = args.iter().skip(1).take_while(|a| *a != "--").take(4).any(|a| a == "acl");
    if !is_acl {
        return args;
    }
    args.into_iter()
        .map(|os| {
            let Some(a) = os.to_str() else { return os };
            let (flag, value) = match a.split_once('=') {
                Some((f, v)) => (f, Some(v)),
                None => (a, None),
            };
            match flag {
                "-policy" | "-ttl" | "-name" | "-description" | "-json" => {
                    let long = format!("-{flag}");
                    value.map_or(long.clone(), |v| format!("{long}={v}")).into()
                }
                _ => os,
            }
        })
        .collect()
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn expires(t: &AclToken) -> String {
    if t.expiration_time_ms == 0 {
        "never".into()
    } else {
        crate::output::clock(t.expiration_time_ms)
    }
}

fn print_token(t: &AclToken) {
    println!("Accessor ID  = {}", t.accessor_id);
    if !t.secret_id.is_empty() {
        println!("Secret ID    = {}", t.secret_id);
    }
    println!("Name         = {}", t.name);
    println!("Type         = {}", t.r#type);
    println!("Policies     = {}", if t.policies.is_empty() { "n/a".to_string() } else { t.policies.join(", ") });
    println!("Create Index = {}", t.create_index);
    println!("Expires      = {}", expires(t));
}

pub async fn acl(addr: &str, cmd: AclCommand) -> anyhow::Result<ExitCode> {
    let mut c = connect(addr).await?;
    match cmd {
        AclCommand::Bootstrap { json } => {
            let r = c.acl.bootstrap(AclBootstrapRequest {}).await.map_err(status_err)?.into_inner();
            let t = r.token.context("the server answered without a token")?;
            if json {
                print_json(&t)?;
            } else {
                print_token(&t);
            }
        }
        AclCommand::Policy(AclPolicyCommand::Apply { name, file, description }) => {
            let rules = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let file_name = file.display().to_string();
            // Checked here first, so that problems name the file as the user knows it.
            mlp_server::acl::policy::parse(&rules, &file_name).map_err(|e| anyhow::anyhow!("{file_name} has errors:\n{e}"))?;
            let policy = AclPolicy { name: name.clone(), description, rules, ..Default::default() };
            c.acl.policy_apply(AclPolicyApplyRequest { policy: Some(policy), file_name }).await.map_err(status_err)?;
            println!("Successfully wrote {name:?} ACL policy!");
        }
        AclCommand::Policy(AclPolicyCommand::List { json }) => {
            let r = c.acl.policy_list(AclPolicyListRequest {}).await.map_err(status_err)?.into_inner();
            if json {
                print_json(&r.policies)?;
            } else if r.policies.is_empty() {
                println!("No policies found");
            } else {
                let mut t = Table::new(&["Name", "Description"]);
                for p in &r.policies {
                    t.row(vec![p.name.clone(), p.description.clone()]);
                }
                print!("{}", t.render());
            }
        }
        AclCommand::Policy(AclPolicyCommand::Info { name, json }) => {
            let r = c.acl.policy_get(AclPolicyGetRequest { name }).await.map_err(status_err)?.into_inner();
            let p = r.policy.context("the server answered without a policy")?;
            if json {
                print_json(&p)?;
            } else {
                println!("Name        = {}", p.name);
                println!("Description = {}", p.description);
                println!("Modify Index = {}", p.modify_index);
                println!("\nRules\n\n{}", p.rules.trim_end());
            }
        }
        AclCommand::Policy(AclPolicyCommand::Delete { name }) => {
            c.acl.policy_delete(AclPolicyDeleteRequest { name: name.clone() }).await.map_err(status_err)?;
            println!("Successfully deleted {name:?} ACL policy!");
        }
        AclCommand::Token(AclTokenCommand::Create { policies, ttl, name, json }) => {
            let req = AclTokenCreateRequest { name, policies, ttl_ms: ttl.map(ms).unwrap_or(0) };
            if ttl.is_some() && req.ttl_ms == 0 {
                anyhow::bail!("--ttl must be longer than 0");
            }
            let r = c.acl.token_create(req).await.map_err(status_err)?.into_inner();
            let t = r.token.context("the server answered without a token")?;
            if json {
                print_json(&t)?;
            } else {
                print_token(&t);
            }
        }
        AclCommand::Token(AclTokenCommand::List { json }) => {
            let r = c.acl.token_list(AclTokenListRequest {}).await.map_err(status_err)?.into_inner();
            if json {
                print_json(&r.tokens)?;
            } else {
                let mut t = Table::new(&["Name", "Type", "Accessor ID", "Policies", "Expires"]);
                for tok in &r.tokens {
                    t.row(vec![tok.name.clone(), tok.r#type.clone(), tok.accessor_id.clone(), tok.policies.join(","), expires(tok)]);
                }
                print!("{}", t.render());
            }
        }
        AclCommand::Token(AclTokenCommand::Info { accessor_id, json }) => {
            let r = c.acl.token_get(AclTokenGetRequest { accessor_id: accessor_id.unwrap_or_default() }).await.map_err(status_err)?;
            let t = r.into_inner().token.context("the server answered without a token")?;
            if json {
                print_json(&t)?;
            } else {
                print_token(&t);
            }
        }
        AclCommand::Token(AclTokenCommand::Delete { accessor_id }) => {
            c.acl.token_delete(AclTokenDeleteRequest { accessor_id: accessor_id.clone() }).await.map_err(status_err)?;
            println!("Token {accessor_id} successfully deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn nomad_single_dash_flags() {
        let v = |a: &[&str]| a.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(
            super::nomad_flags(v(&["mlp", "acl", "token", "create", "-policy", "p", "-ttl=1h"])),
            v(&["mlp", "acl", "token", "create", "--policy", "p", "--ttl=1h"])
        );
        assert_eq!(super::nomad_flags(v(&["mlp", "job", "run", "-name"])), v(&["mlp", "job", "run", "-name"]));
        assert_eq!(
            super::nomad_flags(v(&["mlp", "--address", "h:1", "acl", "token", "create", "-policy", "p"])),
            v(&["mlp", "--address", "h:1", "acl", "token", "create", "--policy", "p"])
        );
    }
}
