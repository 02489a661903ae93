//! The value-matching operators of constraints and affinities (`regexp`, `version`, `semver`),
//! compiled once here so that the validator (which refuses what cannot compile) and the
//! scheduler (which matches node attributes) agree on what a pattern means.
//!
//! Patterns use the `regex` crate: matching is linear in the input, and compilation is bounded
//! by [`MAX_PATTERN_BYTES`], [`REGEX_SIZE_LIMIT`] and [`REGEX_NEST_LIMIT`], so no pattern a
//! client sends can make a server spend unbounded time or stack on it.

use regex::{Regex, RegexBuilder};
use semver::{Version, VersionReq};

/// Longest `regexp`, `version` or `semver` operand accepted, in bytes.
pub const MAX_PATTERN_BYTES: usize = 1024;
/// Largest compiled program one pattern may produce (bytes, as the `regex` crate counts).
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Deepest nesting of groups and repetitions in one pattern.
pub const REGEX_NEST_LIMIT: u32 = 32;

/// Why an operand cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatchError {
    /// The operand is longer than [`MAX_PATTERN_BYTES`].
    #[error("pattern is {len} bytes; at most {MAX_PATTERN_BYTES} (limit: pattern length)")]
    TooLong { len: usize },
    /// The regular expression does not compile (syntax, size or nesting limit).
    #[error("invalid regular expression: {0}")]
    Regex(String),
    /// The version constraint does not parse.
    #[error("invalid version constraint {text:?}: {reason}")]
    VersionReq { text: String, reason: String },
}

/// Compiles a `regexp` operand with the size and nesting limits.
pub fn compile_regex(pattern: &str) -> Result<Regex, MatchError> {
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(MatchError::TooLong { len: pattern.len() });
    }
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .nest_limit(REGEX_NEST_LIMIT)
        .build()
        // The crate's message spans several lines (it draws the pattern); one line reads better.
        .map_err(|e| MatchError::Regex(e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")))
}

/// Parses the operand of `version` (Nomad's go-version shape: `>= 1.2, < 2.0`, `~> 1.2`, `1.2.3`)
/// or `semver` (`>= 1.2.3, < 2.0.0`).
pub fn parse_version_req(operator: &str, text: &str) -> Result<VersionReq, MatchError> {
    if text.len() > MAX_PATTERN_BYTES {
        return Err(MatchError::TooLong { len: text.len() });
    }
    let bad = |reason: String| MatchError::VersionReq { text: text.to_string(), reason };
    let mut parts = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(bad("empty constraint between commas".into()));
        }
        if let Some(rest) = part.strip_prefix("~>") {
            if operator == "semver" {
                return Err(bad("`~>` is a `version` operator; semver uses `~` or `^`".into()));
            }
            parts.extend(pessimistic(rest.trim()).map_err(bad)?);
        } else if part.starts_with(|c: char| c.is_ascii_digit() || c == 'v') {
            // A bare version means exactly that version, as in go-version (semver would read `^`).
            parts.push(format!("={}", part.trim_start_matches('v')));
        } else {
            parts.push(part.to_string());
        }
    }
    VersionReq::parse(&parts.join(", ")).map_err(|e| bad(e.to_string()))
}

/// `~> X.Y` → `>= X.Y, < X+1`; `~> X.Y.Z` → `>= X.Y.Z, < X.Y+1` (go-version's pessimistic
/// operator).
fn pessimistic(v: &str) -> Result<Vec<String>, String> {
    let nums: Vec<u64> = v
        .trim_start_matches('v')
        .split('.')
        .map(|p| p.parse::<u64>().map_err(|_| format!("`~> {v}` needs a numeric version")))
        .collect::<Result<_, _>>()?;
    let upper = match nums.as_slice() {
        [major] | [major, _] => format!("<{}", major.saturating_add(1)),
        [major, minor, _] => format!("<{major}.{}", minor.saturating_add(1)),
        _ => return Err(format!("`~> {v}` needs one to three version numbers")),
    };
    Ok(vec![format!(">={}", v.trim_start_matches('v')), upper])
}

/// A node attribute as a version: strict for `semver`; for `version` a leading `v` is dropped and
/// missing minor/patch numbers count as 0 (`5.15` → `5.15.0`, `6.1.0-13-amd64` keeps its
/// pre-release part, a fourth number is ignored), as go-version reads versions.
pub fn parse_version(operator: &str, value: &str) -> Option<Version> {
    let value = value.trim();
    if operator == "semver" {
        return Version::parse(value).ok();
    }
    let value = value.strip_prefix('v').unwrap_or(value);
    let split = value.find(['-', '+']).unwrap_or(value.len());
    let (core, rest) = value.split_at(split);
    let nums: Vec<&str> = core.split('.').collect();
    if nums.is_empty() || nums.len() > 4 || nums.iter().any(|n| n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    let get = |i: usize| nums.get(i).copied().unwrap_or("0").trim_start_matches('0').to_string();
    let num = |s: String| if s.is_empty() { "0".to_string() } else { s };
    Version::parse(&format!("{}.{}.{}{rest}", num(get(0)), num(get(1)), num(get(2)))).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_limits() {
        assert!(compile_regex("^lin").is_ok());
        assert!(matches!(compile_regex("("), Err(MatchError::Regex(_))));
        assert!(matches!(compile_regex(&"a".repeat(2000)), Err(MatchError::TooLong { len: 2000 })));
        // Deep nesting and huge repetitions are refused instead of compiled.
        assert!(compile_regex(&format!("{}a{}", "(".repeat(100), ")".repeat(100))).is_err());
        assert!(compile_regex("(((a{1000}){1000}){1000})").is_err());
    }

    #[test]
    fn versions() {
        let holds =
            |op: &str, req: &str, v: &str| parse_version_req(op, req).ok().zip(parse_version(op, v)).is_some_and(|(r, v)| r.matches(&v));
        assert!(holds("version", ">= 1.2, < 2.0", "1.5"));
        assert!(!holds("version", ">= 1.2, < 2.0", "2.0"));
        assert!(holds("version", "~> 1.2", "1.9.3"));
        assert!(!holds("version", "~> 1.2", "2.0.0"));
        assert!(holds("version", "~> 1.2.3", "1.2.9"));
        assert!(!holds("version", "~> 1.2.3", "1.3.0"));
        assert!(holds("version", "1.2.3", "v1.2.3"));
        assert!(!holds("version", "1.2.3", "1.2.4"));
        assert!(holds("version", ">= 5.10", "6.1.0"));
        assert!(holds("semver", ">= 1.2.3, < 2.0.0", "1.10.0"));
        assert!(!holds("semver", ">= 1.2.3", "1.2"));
        assert!(parse_version_req("version", "nonsense").is_err());
        assert!(parse_version_req("version", ">= 1.2,").is_err());
        assert!(parse_version_req("semver", "~> 1.2").is_err());
        assert!(parse_version("version", "1.2.3.4").is_some());
        assert!(parse_version("version", "abc").is_none());
    }
}
