//! Node secrets (issue 15 §3): a random secret the servers hand an agent when it first registers
//! its node id, kept by the servers only as a SHA-256 hash (in the replicated state), and
//! presented by the agent on every later agent RPC in the [`METADATA_KEY`] gRPC metadata entry.

use ring::rand::SecureRandom;

/// The gRPC metadata entry that carries the node secret.
pub const METADATA_KEY: &str = "x-mlp-node-secret";

/// Bytes of randomness in a secret (written as twice as many hex digits).
const SECRET_BYTES: usize = 32;

/// The system's random number generator failed.
#[derive(Debug, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RandomError;

/// A fresh secret: 64 lowercase hex digits from the system RNG.
pub fn generate() -> Result<String, RandomError> {
    let mut bytes = [0u8; SECRET_BYTES];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| RandomError)?;
    Ok(hex(&bytes))
}

/// The hash the servers keep: SHA-256 of the secret, hex.
pub fn hash(secret: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

/// Whether `presented` hashes to `stored`, comparing in constant time.
pub fn verify(presented: &str, stored: &str) -> bool {
    let h = hash(presented);
    let (a, b) = (h.as_bytes(), stored.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `s` looks like a secret this module generated (what an agent may present).
pub fn well_formed(s: &str) -> bool {
    s.len() == SECRET_BYTES * 2 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_verify_against_their_hash_only() -> Result<(), RandomError> {
        let a = generate()?;
        let b = generate()?;
        assert_ne!(a, b);
        assert!(well_formed(&a));
        assert!(verify(&a, &hash(&a)));
        assert!(!verify(&b, &hash(&a)));
        assert!(!verify("", &hash(&a)));
        assert!(!well_formed("xyz"));
        Ok(())
    }
}
