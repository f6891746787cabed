//! Strict parsers of option values: whole numbers, seconds, rates and byte
//! sizes. Each refuses what it cannot take exactly, with a message that
//! names the option, the value given and what to write instead; a number
//! that would only fail later (a negative count, a timeout no clock can
//! reach, a size in a unit nobody documented) never gets past parsing.

use std::ffi::OsStr;

use clap::builder::TypedValueParser;
use clap::error::ErrorKind;

/// The longest wait or run, in seconds, an option takes: a week. Longer ones
/// are mistakes (`--duration 2e9`), and a clock cannot reach some of them.
pub const MAX_SECONDS: f64 = 604_800.0;

/// The longest `--busy-poll-us`: spinning a whole second for a reply is
/// already a core given away.
pub const MAX_BUSY_POLL_US: u64 = 1_000_000;

/// A clap value parser from a function whose error says what the value must
/// be (`must be a whole number ≥ 1, not `-1``); the option's name goes in
/// front, so the whole reads `--count must be a whole number ≥ 1, not `-1``.
#[derive(Clone, Copy)]
pub struct Strict<T>(pub fn(&str) -> Result<T, String>);

impl<T: Clone + Send + Sync + 'static> TypedValueParser for Strict<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<T, clap::Error> {
        let option = arg
            .and_then(clap::Arg::get_long)
            .map_or_else(|| "the value".to_string(), |l| format!("--{l}"));
        let parsed = match value.to_str() {
            // Options take values that start with `-`, so a negative number
            // reaches the check above; an option in its place means the
            // value was left out.
            Some(text) if text.starts_with("--") => (self.0)(text)
                .map_err(|why| format!("{why} (`{text}` is an option: was the value left out?)")),
            Some(text) => (self.0)(text),
            None => Err(format!("must be text, not `{}`", value.to_string_lossy())),
        };
        parsed.map_err(|why| {
            clap::Error::raw(ErrorKind::ValueValidation, format!("{option} {why}"))
                .format(&mut cmd.clone())
        })
    }
}

/// A whole number from `min` to `max`, written in decimal digits.
pub fn whole(text: &str, min: u64, max: u64) -> Result<u64, String> {
    let range = if max == u64::MAX {
        format!("a whole number ≥ {min}")
    } else {
        format!("a whole number from {min} to {max}")
    };
    if text.is_empty() {
        return Err(format!("must be {range}, not empty"));
    }
    let Some(n) = text
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| text.parse::<u64>().ok())
        .flatten()
    else {
        return Err(format!("must be {range}, not `{text}`"));
    };
    if n < min || n > max {
        return Err(format!("must be {range}, not `{text}`"));
    }
    Ok(n)
}

/// `--count`: how many messages, at least one.
pub fn count(text: &str) -> Result<u64, String> {
    whole(text, 1, u64::MAX)
}

/// `--seed`: any 64-bit unsigned number.
pub fn seed(text: &str) -> Result<u64, String> {
    whole(text, 0, u64::MAX)
}

/// `send --subscribers`: receivers to wait for, at least one (with none,
/// every message would go nowhere).
pub fn receivers(text: &str) -> Result<usize, String> {
    whole(text, 1, usize::MAX as u64).map(|n| usize::try_from(n).expect("at most usize::MAX"))
}

/// `--busy-poll-us`: microseconds of spinning, 0 (off) to [`MAX_BUSY_POLL_US`].
pub fn busy_poll_us(text: &str) -> Result<u64, String> {
    whole(text, 0, MAX_BUSY_POLL_US)
        .map_err(|e| format!("{e} (0 turns spinning off; {MAX_BUSY_POLL_US} is one second)"))
}

/// A finite decimal number (`2`, `0.5`, `1e-3`), or why `text` is not one.
fn decimal(text: &str, must: &str) -> Result<f64, String> {
    // Rust also parses `inf`, `NaN` and `+2`; a number of seconds is digits.
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
        && text.as_bytes()[0] != b'+';
    match text.parse::<f64>() {
        Ok(x) if plain && x.is_finite() => Ok(x),
        _ => {
            let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
            let hint = if !digits.is_empty() && digits != text && digits.parse::<f64>().is_ok() {
                format!(" (write {digits}, without a unit)")
            } else {
                String::new()
            };
            Err(format!("must be {must}, not `{text}`{hint}"))
        }
    }
}

/// `--duration`, `--wait`, `--idle-timeout`: seconds above 0, at most [`MAX_SECONDS`].
pub fn seconds(text: &str) -> Result<f64, String> {
    let must = "a number of seconds above 0 and at most 604800 (a week)";
    let s = decimal(text, must)?;
    if s > 0.0 && s <= MAX_SECONDS {
        Ok(s)
    } else {
        Err(format!("must be {must}, not `{text}`"))
    }
}

/// `--rate`: messages per second, at least one a week (a longer pause
/// between two messages is a mistake, and a clock cannot reach some).
pub fn rate(text: &str) -> Result<f64, String> {
    let must = "a number of messages per second, at least one a week (1/604800 ≈ 0.00000166)";
    let hz = decimal(text, must)?;
    if hz > 0.0 && 1.0 / hz <= MAX_SECONDS {
        Ok(hz)
    } else {
        Err(format!("must be {must}, not `{text}`"))
    }
}

pub use tensorferry::device_map::units::{in_largest_unit, size};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_numbers_refuse_signs_fractions_and_words() {
        assert_eq!(count("3"), Ok(3));
        assert_eq!(seed("0"), Ok(0));
        assert_eq!(seed("18446744073709551615"), Ok(u64::MAX));
        for bad in [
            "-1",
            "0",
            "+1",
            "1.5",
            "1e3",
            " 1",
            "x",
            "18446744073709551616",
        ] {
            let e = count(bad).expect_err(bad);
            assert!(
                e.contains("whole number ≥ 1") && e.contains(&format!("`{bad}`")),
                "{e}"
            );
        }
        assert!(count("").is_err_and(|e| e.ends_with("not empty")));
        assert_eq!(busy_poll_us("0"), Ok(0));
        assert!(busy_poll_us("1000001").is_err_and(|e| e.contains("from 0 to 1000000")));
    }

    #[test]
    fn seconds_are_positive_finite_and_at_most_a_week() {
        assert_eq!(seconds("0.2"), Ok(0.2));
        assert_eq!(seconds("1e-3"), Ok(0.001));
        assert_eq!(seconds("604800"), Ok(MAX_SECONDS));
        for bad in [
            "-1", "0", "-0", "NaN", "nan", "inf", "-inf", "1e30", "604801", "", "x", "+2",
        ] {
            let e = seconds(bad).expect_err(bad);
            assert!(e.contains("seconds above 0"), "{bad}: {e}");
        }
        assert!(seconds("2s").is_err_and(|e| e.contains("write 2, without a unit")));
        assert!(rate("1").is_ok());
        for bad in ["0", "-5", "1e-30", "NaN", "inf"] {
            assert!(rate(bad).is_err(), "{bad}");
        }
    }
}
