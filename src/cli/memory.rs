//! How much memory this machine has, and the check that a size a user wrote
//! (a tensor's shape, a bench message size) fits in it, made before anything
//! of that size is allocated: a size that cannot fit is an error that says
//! so, not an allocation failure that ends the process.

use super::human_bytes;

/// This machine's memory in bytes (`MemTotal` in `/proc/meminfo`), or `None`
/// where it cannot be read; then only sizes that overflow are refused.
pub fn total_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    mem_total(&text)
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// Checks that `bytes` (`None`: more than a 64-bit count holds) fit in this
/// machine's memory. `what` names the input and what is held, e.g.
/// "--tensor x=f32:1000x1000: the tensor".
///
/// # Errors
///
/// A message naming `what`, its byte count and this machine's memory.
pub fn check(what: &str, bytes: Option<u64>, fix: &str) -> Result<(), String> {
    check_against(what, bytes, total_bytes(), fix)
}

fn check_against(
    what: &str,
    bytes: Option<u64>,
    total: Option<u64>,
    fix: &str,
) -> Result<(), String> {
    let Some(bytes) = bytes else {
        return Err(format!(
            "{what} needs more than 2^64 bytes, more than any machine can hold; {fix}"
        ));
    };
    match total {
        Some(total) if bytes > total => Err(format!(
            "{what} needs {bytes} bytes ({}), more than this machine's memory ({}, MemTotal in /proc/meminfo); {fix}",
            human_bytes(bytes),
            human_bytes(total)
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_total_in_bytes() {
        let text = "MemTotal:       24683584 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total(text), Some(24_683_584 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total("MemTotal: x kB\n"), None);
    }

    #[test]
    fn refuses_what_does_not_fit_naming_both_sizes() {
        let gib = 1u64 << 30;
        assert!(check_against("x", Some(gib), Some(2 * gib), "fix").is_ok());
        assert!(check_against("x", Some(gib), None, "fix").is_ok());
        let e = check_against(
            "--sizes 4GiB: a row",
            Some(4 * gib),
            Some(2 * gib),
            "give less",
        )
        .expect_err("too big");
        assert!(
            e.contains("--sizes 4GiB: a row needs 4294967296 bytes (4.0 GiB)")
                && e.contains("memory (2.0 GiB, MemTotal")
                && e.ends_with("give less"),
            "{e}"
        );
        assert!(check_against("x", None, None, "fix").is_err_and(|e| e.contains("2^64")));
    }
}
