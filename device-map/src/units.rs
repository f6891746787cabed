//! Byte sizes as people write them in options and configuration files:
//! `4096`, `4KiB`, `64MiB`, `2GiB`. Units are taken exactly as written (a
//! `kb` is refused, with the likely meaning suggested), so a size never
//! silently means something other than what its writer thought.

/// The units a size may be written in, exactly so, and their bytes.
const UNITS: [(&str, u64); 4] = [
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
];

/// `4KiB`, `64MiB`, `4096`: a byte count in one of [`UNITS`], at least 1 byte.
pub fn size(text: &str) -> Result<u64, String> {
    // A list item may carry the space after its comma (`--sizes "4KiB, 1MiB"`).
    let t = text.trim();
    let form = "write a whole number of B, KiB, MiB or GiB, e.g. 4KiB or 64MiB (1KiB = 1024 bytes)";
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(end);
    if t.starts_with('-') {
        return Err(format!("takes sizes of at least 1 byte, not `{t}`"));
    }
    if number.is_empty() {
        return Err(format!("takes sizes, not `{t}`; {form}"));
    }
    let exact = UNITS.iter().find(|(u, _)| *u == unit).map(|(_, m)| *m);
    let Some(mult) = exact.or(unit.is_empty().then_some(1)) else {
        let suggestion = suggest_unit(number, unit);
        return Err(match suggestion {
            Some(s) => format!("takes the units B, KiB, MiB and GiB, written exactly so, not `{t}`: did you mean {s}?"),
            None => format!("takes the units B, KiB, MiB and GiB, written exactly so, not `{t}`; {form}"),
        });
    };
    if !number.contains('.') && number.parse::<u64>().is_err() {
        return Err(format!("takes sizes up to 2^64-1 bytes, not `{t}`"));
    }
    let Ok(n) = number.parse::<u64>() else {
        // A fraction (`1.5MiB`): say which whole number of a smaller unit it is.
        let exact = number
            .parse::<f64>()
            .ok()
            .map(|x| x * mult as f64)
            .filter(|b| b.fract() == 0.0 && *b >= 1.0 && *b < 2f64.powi(63))
            .map(|b| in_largest_unit(b as u64));
        return Err(match exact {
            Some(s) => {
                format!("takes whole numbers of B, KiB, MiB or GiB, not `{t}`: did you mean {s}?")
            }
            None => format!("takes whole numbers of B, KiB, MiB or GiB, not `{t}`; {form}"),
        });
    };
    match n.checked_mul(mult) {
        Some(0) => Err(format!("takes sizes of at least 1 byte, not `{t}`")),
        Some(bytes) => Ok(bytes),
        None => Err(format!("takes sizes up to 2^64-1 bytes, not `{t}`")),
    }
}

/// `bytes` written in the largest unit that holds it exactly: `1536KiB`.
pub fn in_largest_unit(bytes: u64) -> String {
    let (unit, mult) = UNITS
        .iter()
        .rev()
        .find(|(_, m)| bytes % m == 0)
        .expect("every count is a whole number of bytes");
    format!("{}{unit}", bytes / mult)
}

/// What `NUMBER` with a near-miss `unit` (`kb`, `MB`, `g`, ` KiB`, `TiB`)
/// was most likely meant to be.
fn suggest_unit(number: &str, unit: &str) -> Option<String> {
    let u = unit.trim().to_ascii_lowercase();
    let meant = match u.as_str() {
        "b" | "byte" | "bytes" => "B",
        "k" | "kb" | "kib" | "kbyte" | "kbytes" => "KiB",
        "m" | "mb" | "mib" => "MiB",
        "g" | "gb" | "gib" => "GiB",
        "t" | "tb" | "tib" => {
            // No TiB unit: the same bytes in GiB.
            let n: u64 = number.parse().ok()?;
            return n.checked_mul(1024).map(|g| format!("{g}GiB"));
        }
        _ => return None,
    };
    Some(format!("{number}{meant}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_the_documented_units_exactly_and_suggest_the_likely_one() {
        assert_eq!(size("4096"), Ok(4096));
        assert_eq!(size("4096B"), Ok(4096));
        assert_eq!(size("4KiB"), Ok(4096));
        assert_eq!(size(" 1MiB"), Ok(1 << 20));
        assert_eq!(size("2GiB"), Ok(2 << 30));
        for (bad, meant) in [
            ("4kb", "4KiB"),
            ("4KB", "4KiB"),
            ("4Kb", "4KiB"),
            ("4k", "4KiB"),
            ("4kib", "4KiB"),
            ("64MB", "64MiB"),
            ("1g", "1GiB"),
            ("4 KiB", "4KiB"),
            ("2TiB", "2048GiB"),
            ("1.5MiB", "1536KiB"),
            ("4b", "4B"),
        ] {
            let e = size(bad).expect_err(bad);
            assert!(e.contains(&format!("did you mean {meant}?")), "{bad}: {e}");
        }
        for bad in [
            "0",
            "0KiB",
            "-4KiB",
            "KiB",
            "4XB",
            "",
            "99999999999999999999GiB",
            "17179869184GiB",
        ] {
            assert!(size(bad).is_err(), "{bad}");
        }
    }
}
