//! The replicated part of ACLs: policies and tokens (hashed) in `ClusterState::acl`, changed
//! only by `Command::Acl` entries. Secrets, ids and times are chosen by the proposer; `apply`
//! reads neither clock nor randomness.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::policy::Policy;

/// `AclToken.type` of a token that may do everything.
pub const MANAGEMENT: &str = "management";
/// `AclToken.type` of a token limited to its policies.
pub const CLIENT: &str = "client";

/// A stored policy: the text as applied and its parsed form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredPolicy {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The HCL text as applied (shown by `mlp acl policy info`).
    pub rules: String,
    pub parsed: Policy,
    #[serde(default)]
    pub create_index: u64,
    #[serde(default)]
    pub modify_index: u64,
}

/// A stored token: never its secret, only the secret's SHA-256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredToken {
    pub accessor_id: String,
    /// Lower-case hex SHA-256 of the secret.
    pub secret_hash: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub management: bool,
    #[serde(default)]
    pub policies: Vec<String>,
    #[serde(default)]
    pub create_time_ms: u64,
    /// 0: never expires.
    #[serde(default)]
    pub expiration_time_ms: u64,
    #[serde(default)]
    pub create_index: u64,
}

impl StoredToken {
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expiration_time_ms != 0 && self.expiration_time_ms <= now_ms
    }

    /// The API's view (no secret).
    pub fn view(&self) -> mlp_proto::v1::AclToken {
        mlp_proto::v1::AclToken {
            accessor_id: self.accessor_id.clone(),
            secret_id: String::new(),
            name: self.name.clone(),
            r#type: if self.management { MANAGEMENT } else { CLIENT }.to_string(),
            policies: self.policies.clone(),
            create_time_ms: self.create_time_ms,
            expiration_time_ms: self.expiration_time_ms,
            create_index: self.create_index,
        }
    }
}

impl StoredPolicy {
    pub fn view(&self) -> mlp_proto::v1::AclPolicy {
        mlp_proto::v1::AclPolicy {
            name: self.name.clone(),
            description: self.description.clone(),
            rules: self.rules.clone(),
            create_index: self.create_index,
            modify_index: self.modify_index,
        }
    }
}

/// The hex SHA-256 of a token secret, as stored.
pub fn hash_secret(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Policies and tokens. Absent in older snapshots and log entries (then empty: not
/// bootstrapped).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AclState {
    /// Whether `mlp acl bootstrap` already created the first management token (it works once).
    #[serde(default)]
    pub bootstrapped: bool,
    #[serde(default)]
    pub policies: BTreeMap<String, StoredPolicy>,
    /// Tokens by `secret_hash` (what every request looks up).
    #[serde(default)]
    pub tokens: BTreeMap<String, StoredToken>,
}

/// A change to policies or tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AclCommand {
    /// The first management token; refused once the cluster is bootstrapped.
    Bootstrap {
        token: StoredToken,
    },
    /// Create or replace a policy (parsed and validated by the proposer).
    UpsertPolicy {
        policy: StoredPolicy,
    },
    DeletePolicy {
        name: String,
    },
    /// A new token; every policy it names must exist.
    CreateToken {
        token: StoredToken,
    },
    DeleteToken {
        accessor_id: String,
    },
    /// Forget the tokens expired at `now_ms` (the leader's garbage collection).
    DeleteExpired {
        now_ms: u64,
    },
}

impl AclState {
    pub fn token_by_accessor(&self, accessor: &str) -> Option<&StoredToken> {
        self.tokens.values().find(|t| t.accessor_id == accessor)
    }

    /// Applies one command at Raft `index`; `Err` is the refusal the proposer reports. Returns
    /// what was removed by `DeleteExpired` (as a count).
    pub fn apply(&mut self, index: u64, cmd: &AclCommand) -> Result<Option<String>, String> {
        match cmd {
            AclCommand::Bootstrap { token } => {
                if self.bootstrapped {
                    return Err("ACL bootstrap already done: the cluster has a management token".into());
                }
                let mut token = token.clone();
                token.create_index = index;
                token.management = true;
                self.bootstrapped = true;
                self.tokens.insert(token.secret_hash.clone(), token);
                Ok(None)
            }
            AclCommand::UpsertPolicy { policy } => {
                let mut policy = policy.clone();
                policy.create_index = self.policies.get(&policy.name).map_or(index, |p| p.create_index);
                policy.modify_index = index;
                self.policies.insert(policy.name.clone(), policy);
                Ok(None)
            }
            AclCommand::DeletePolicy { name } => match self.policies.remove(name) {
                Some(_) => Ok(None),
                None => Err(format!("no ACL policy {name:?}")),
            },
            AclCommand::CreateToken { token } => {
                if let Some(missing) = token.policies.iter().find(|p| !self.policies.contains_key(*p)) {
                    return Err(format!("no ACL policy {missing:?}"));
                }
                if self.tokens.contains_key(&token.secret_hash) || self.token_by_accessor(&token.accessor_id).is_some() {
                    return Err("a token with this secret or accessor id exists".into());
                }
                let mut token = token.clone();
                token.create_index = index;
                self.tokens.insert(token.secret_hash.clone(), token);
                Ok(None)
            }
            AclCommand::DeleteToken { accessor_id } => {
                let Some(hash) = self.token_by_accessor(accessor_id).map(|t| t.secret_hash.clone()) else {
                    return Err(format!("no ACL token with accessor id {accessor_id:?}"));
                };
                self.tokens.remove(&hash);
                Ok(None)
            }
            AclCommand::DeleteExpired { now_ms } => {
                let before = self.tokens.len();
                self.tokens.retain(|_, t| !t.expired(*now_ms));
                Ok(Some((before - self.tokens.len()).to_string()))
            }
        }
    }

    /// Whether any token is expired at `now_ms` (the garbage collector's cheap check).
    pub fn has_expired(&self, now_ms: u64) -> bool {
        self.tokens.values().any(|t| t.expired(now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(accessor: &str, secret: &str, policies: &[&str], expires: u64) -> StoredToken {
        StoredToken {
            accessor_id: accessor.into(),
            secret_hash: hash_secret(secret),
            name: accessor.into(),
            management: false,
            policies: policies.iter().map(|p| p.to_string()).collect(),
            create_time_ms: 1,
            expiration_time_ms: expires,
            create_index: 0,
        }
    }

    #[test]
    fn bootstrap_once_tokens_need_policies_expired_ones_go() {
        let mut st = AclState::default();
        st.apply(1, &AclCommand::Bootstrap { token: token("root", "s0", &[], 0) }).expect("first bootstrap");
        assert!(st.apply(2, &AclCommand::Bootstrap { token: token("root2", "s1", &[], 0) }).is_err());
        assert!(st.tokens.values().all(|t| t.accessor_id == "root" && t.management));
        let err = st.apply(3, &AclCommand::CreateToken { token: token("a", "s2", &["readers"], 0) }).expect_err("no policy");
        assert!(err.contains("readers"), "{err}");
        let policy = StoredPolicy {
            name: "readers".into(),
            description: String::new(),
            rules: String::new(),
            parsed: Policy::default(),
            create_index: 0,
            modify_index: 0,
        };
        st.apply(4, &AclCommand::UpsertPolicy { policy }).expect("policy");
        st.apply(5, &AclCommand::CreateToken { token: token("a", "s2", &["readers"], 0) }).expect("token");
        st.apply(6, &AclCommand::CreateToken { token: token("b", "s3", &["readers"], 100) }).expect("token");
        assert!(st.apply(7, &AclCommand::CreateToken { token: token("c", "s3", &[], 0) }).is_err(), "same secret twice");
        assert_eq!(st.apply(8, &AclCommand::DeleteExpired { now_ms: 100 }), Ok(Some("1".into())));
        assert!(st.token_by_accessor("b").is_none());
        assert!(st.token_by_accessor("a").is_some());
        st.apply(9, &AclCommand::DeleteToken { accessor_id: "a".into() }).expect("delete");
        assert!(st.apply(10, &AclCommand::DeleteToken { accessor_id: "a".into() }).is_err());
        assert!(!st.tokens.values().any(|t| t.secret_hash == "s0"), "secrets are stored hashed");
        assert_eq!(hash_secret("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
