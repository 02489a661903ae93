//! Hostile input through every decoder (stable Rust, proptest): random bytes and mutations of the
//! example and fixture job specs through the HCL decoder, mutated JSON and protobuf encodings of a
//! valid job through serde_json / prost and the validator. None may panic, overflow the stack or
//! hang; each input finishes within a generous bound (a hang detector, not a speed claim).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use mlp_proto::jobspec;
use mlp_proto::v1::Job;
use proptest::prelude::*;
use prost::Message;

/// Far above any real decode time; only an input-driven blow-up comes near it.
const PER_INPUT: Duration = Duration::from_secs(10);

fn seeds() -> Vec<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    ["examples/train.hcl", "examples/serve.hcl", "proto/tests/fixtures/good/full.hcl", "proto/tests/fixtures/bad/multiple_errors.hcl"]
        .iter()
        .map(|p| std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("seed {p}: {e}")))
        .collect()
}

/// Tokens that reach the parser's and validator's edge cases when spliced in.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "(",
    ")",
    "\"",
    "${",
    "%{",
    "$${",
    "!",
    "-",
    "+",
    "?",
    ":",
    "=",
    "\n",
    "#",
    "//",
    "/*",
    "*/",
    "<<EOF\n",
    "\nEOF\n",
    "\\",
    "\\u0000",
    "regexp",
    "version",
    "semver",
    "((((a))))",
    "(a+)+$",
    "~> 1.2",
    "count = 4294967295",
    "count = -1",
    "weight = 0",
    "group \"g\" {",
    "task \"t\" {",
    "constraint {",
    "affinity {",
    "spread {",
    "gpu {",
    "1e308",
    "99999999999999999999",
    "\u{200b}",
    "é",
    "\u{0}",
];

#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, usize),
    Delete(usize, usize),
    Repeat(usize, usize, u8),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Edit::Flip(a, b)),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(a, t)| Edit::Insert(a, t)),
        (any::<usize>(), 1usize..64).prop_map(|(a, n)| Edit::Delete(a, n)),
        (any::<usize>(), 0..TOKENS.len(), 1u8..200).prop_map(|(a, t, n)| Edit::Repeat(a, t, n)),
    ]
}

fn mutate(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let at = |a: usize, len: usize| if len == 0 { 0 } else { a % (len + 1) };
        match *e {
            Edit::Flip(a, b) if !bytes.is_empty() => {
                let i = a % bytes.len();
                bytes[i] ^= b;
            }
            Edit::Flip(..) => {}
            Edit::Insert(a, t) => {
                let i = at(a, bytes.len());
                bytes.splice(i..i, TOKENS[t].bytes());
            }
            Edit::Delete(a, n) => {
                let i = at(a, bytes.len());
                let end = (i + n).min(bytes.len());
                bytes.drain(i..end);
            }
            Edit::Repeat(a, t, n) => {
                let i = at(a, bytes.len());
                let run: Vec<u8> = TOKENS[t].bytes().cycle().take(TOKENS[t].len() * usize::from(n)).collect();
                bytes.splice(i..i, run);
            }
        }
    }
    bytes
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    assert!(started.elapsed() < PER_INPUT, "{what} took {:?}", started.elapsed());
    out
}

/// Whatever decoded is validated, with defaults applied the way the servers do.
fn validate_decoded(mut job: Job) {
    jobspec::apply_defaults(&mut job);
    let _ = jobspec::validate_job(&job);
}

fn valid_job() -> Job {
    jobspec::parse_str(&seeds()[0], "train.hcl").expect("the example parses")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn hcl_decoder_survives_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let text = String::from_utf8_lossy(&bytes);
        timed("parse_str(random)", || { let _ = jobspec::parse_str(&text, "fuzz.hcl"); });
    }

    #[test]
    fn hcl_decoder_survives_mutated_specs(seed in 0usize..4, edits in proptest::collection::vec(edit(), 1..12)) {
        let src = seeds()[seed].clone().into_bytes();
        let text = String::from_utf8_lossy(&mutate(src, &edits)).into_owned();
        timed("parse_str(mutated)", || {
            if let Ok(job) = jobspec::parse_str(&text, "fuzz.hcl") {
                // What the file decoder accepts, the server's validator accepts too.
                let mut again = job.clone();
                jobspec::apply_defaults(&mut again);
                prop_assert!(jobspec::validate_job(&again).is_ok(), "parse_str accepted what validate_job refuses:\n{text}");
            }
            Ok(())
        })?;
    }

    #[test]
    fn json_decoder_survives_mutated_jobs(edits in proptest::collection::vec(edit(), 1..12)) {
        let json = serde_json::to_vec(&valid_job()).expect("encode");
        let bytes = mutate(json, &edits);
        timed("serde_json(mutated)", || {
            if let Ok(job) = serde_json::from_slice::<Job>(&bytes) {
                validate_decoded(job);
            }
        });
    }

    #[test]
    fn protobuf_decoder_survives_mutated_and_random_jobs(
        edits in proptest::collection::vec(edit(), 1..12),
        random in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let bytes = mutate(valid_job().encode_to_vec(), &edits);
        timed("prost(mutated)", || {
            for input in [&bytes[..], &random[..]] {
                if let Ok(job) = Job::decode(input) {
                    validate_decoded(job);
                }
            }
        });
    }
}
