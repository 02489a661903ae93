//! Go-style duration strings ("250ms", "1m30s", "1.5h"), the form Nomad job files use.

use std::time::Duration;

const UNITS: &str = "ns, us, ms, s, m, h";

/// Parses a duration such as `"250ms"`, `"5s"`, `"1m30s"`, `"2h"` or `"1h30m10s"`.
/// A bare `"0"` is accepted; empty strings, negative values and unknown units are not.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let fail = |why: String| format!("invalid duration {s:?}: {why}");
    if s.is_empty() {
        return Err(fail("empty".to_string()));
    }
    if s.starts_with('-') {
        return Err(fail("negative durations are not allowed".to_string()));
    }
    let body = s.strip_prefix('+').unwrap_or(s);
    if body == "0" {
        return Ok(Duration::ZERO);
    }

    let mut total: u128 = 0;
    let mut rest = body;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (number, after) = rest.split_at(num_len);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(fail(format!("expected a number at {rest:?}")));
        }
        let unit_len = after.find(|c: char| !c.is_alphabetic()).unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(fail(format!("missing unit after {number:?} (units: {UNITS})"))),
            other => return Err(fail(format!("unknown unit {other:?} (units: {UNITS})"))),
        };
        total = total
            .checked_add(scale_number(number, scale).ok_or_else(|| fail("too large".into()))?)
            .ok_or_else(|| fail("too large".to_string()))?;
        rest = after;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| fail("too large".to_string()))?;
    // The remainder of a division by 1e9 always fits in u32.
    let nanos = u32::try_from(total % 1_000_000_000).unwrap_or(0);
    Ok(Duration::new(secs, nanos))
}

/// `number` (digits with at most one '.') times `scale` nanoseconds, truncating below 1ns.
fn scale_number(number: &str, scale: u128) -> Option<u128> {
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let int: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut value = int.checked_mul(scale)?;
    let mut unit = scale;
    for digit in frac.chars() {
        unit /= 10;
        value = value.checked_add(u128::from(digit.to_digit(10)?) * unit)?;
    }
    Some(value)
}

/// The shortest Go-style rendering of whole milliseconds: `5s`, `1m30s`, `250ms`, `0s`.
pub(crate) fn format_ms(ms: u64) -> String {
    if ms == 0 {
        return "0s".to_string();
    }
    let (h, m, s, rem) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let mut out = String::new();
    for (value, unit) in [(h, "h"), (m, "m"), (s, "s"), (rem, "ms")] {
        if value > 0 {
            out.push_str(&format!("{value}{unit}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_style_durations() {
        let ok = [
            ("250ms", 250),
            ("5s", 5_000),
            ("1m30s", 90_000),
            ("2h", 7_200_000),
            ("1h30m10s", 5_410_000),
            ("1.5s", 1_500),
            ("0", 0),
            ("0s", 0),
        ];
        for (text, ms) in ok {
            assert_eq!(parse_duration(text).map(|d| d.as_millis()), Ok(ms), "{text}");
        }
        assert_eq!(parse_duration("10us"), Ok(Duration::from_micros(10)));
    }

    #[test]
    fn rejects_bad_durations() {
        for text in ["", "-5s", "5", "5 parsecs", "5parsecs", "s", "1..5s", "1m 30s", "h5"] {
            assert!(parse_duration(text).is_err(), "{text:?} should be rejected");
        }
        assert_eq!(parse_duration("5x"), Err(r#"invalid duration "5x": unknown unit "x" (units: ns, us, ms, s, m, h)"#.into()));
    }

    #[test]
    fn formats_milliseconds() {
        assert_eq!(format_ms(0), "0s");
        assert_eq!(format_ms(90_000), "1m30s");
        assert_eq!(format_ms(7_200_000), "2h");
        assert_eq!(format_ms(1_250), "1s250ms");
    }
}
