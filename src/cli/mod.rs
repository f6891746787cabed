//! Subcommands, one module each.

mod check_map;
mod devices;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status for invalid input (a bad option, an invalid file).
pub const EXIT_INVALID: u8 = 2;

/// GPU-aware tensor transport: move named tensors between threads, processes and
/// hosts, with per-channel device maps that say where each tensor lands.
#[derive(Debug, Parser)]
#[command(name = "tensorferry", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List this host's devices: the CPU, CUDA devices (or why there are none)
    /// and wgpu adapters.
    Devices(devices::Args),
    /// Validate a channel configuration file and show where each source device's
    /// tensors land. Exit 0 when valid, 2 when not (every error is listed).
    CheckMap(check_map::Args),
}

/// Parses the command line and runs the subcommand.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Devices(args) => devices::run(&args),
        Command::CheckMap(args) => check_map::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_INVALID)
        }
    }
}

/// What a subcommand returns: its exit code, or a message for stderr (exit 2).
pub type Outcome = Result<ExitCode, String>;

/// Formats a byte count for people: `23.4 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Prints a JSON value to stdout, pretty.
pub fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("a serde_json::Value always serializes")
    );
}
