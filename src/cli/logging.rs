//! Diagnostics on stderr: the `tracing` events of tensorferry's crates,
//! warnings and errors by default, more with `-v` (info), `-vv` (debug) or
//! `-vvv` (trace). `RUST_LOG`, when set, replaces that choice with its own
//! filter and can name other crates too (`RUST_LOG=wgpu_hal=info`); other
//! crates are silent otherwise, so a driver's chatter does not read as ours.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the stderr subscriber for `-v` given `verbose` times.
pub fn init(verbose: u8) {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let mut bad = None;
    let filter = match from_env {
        Some(text) => EnvFilter::try_new(&text).unwrap_or_else(|e| {
            bad = Some(format!(
                "RUST_LOG={text:?} is not a filter ({e}); using the -v level instead (write e.g. RUST_LOG=tensorferry_engine=debug)"
            ));
            level_filter(verbose)
        }),
        None => level_filter(verbose),
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter);
    // Warnings alone read better without a clock; a trace needs one.
    let installed = if verbose == 0 && std::env::var_os("RUST_LOG").is_none() {
        builder.without_time().try_init()
    } else {
        builder
            .with_timer(tracing_subscriber::fmt::time::uptime())
            .try_init()
    };
    if installed.is_ok() {
        if let Some(why) = bad {
            tracing::warn!("{why}");
        }
    }
}

/// Tensorferry's crates at the level `-v` chose, everything else off. A
/// target matches a directive by prefix, so `tensorferry` names this
/// binary and every `tensorferry_*` library.
fn level_filter(verbose: u8) -> EnvFilter {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    EnvFilter::new(format!("off,tensorferry={level}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_v_raises_tensorferry_crates_and_leaves_others_off() {
        for (v, level) in [
            (0, "warn"),
            (1, "info"),
            (2, "debug"),
            (3, "trace"),
            (9, "trace"),
        ] {
            let text = level_filter(v).to_string();
            assert!(
                text.contains(&format!("tensorferry={level}")),
                "{v}: {text}"
            );
            assert!(text.contains("off"), "{v}: {text}");
        }
    }
}
