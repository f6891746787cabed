//! `tensorferry check-map`: validate a configuration and show each resolved table.

use std::path::PathBuf;
use std::process::ExitCode;

use tensorferry_device_map::Inventory;
use tensorferry_engine::delivery;
use tensorferry_kernels::runtime::HostReport;

use super::{print_json, Outcome, EXIT_INVALID};

/// Options of `tensorferry check-map`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The channel configuration file (JSON: {"channels": {NAME: {"pattern",
    /// "device_map", "fallback", "queue_depth", "overflow", "wire_dtype",
    /// "keep_wire_dtype", "checksum"}}}; see docs/device-maps.md).
    file: PathBuf,

    /// Check against these devices instead of this host's, e.g.
    /// `cpu,cuda:0,cuda:1,wgpu:0` (to validate a configuration meant for another machine).
    #[arg(long, value_name = "LIST")]
    devices: Option<String>,

    /// Print one JSON object: {"valid", "errors": [{"channel", "path", "message"}],
    /// "channels": {NAME: {"resolved": {SOURCE: {"target", "reason", "detail"}}}}}.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> Outcome {
    let inventory = match &args.devices {
        Some(list) => list
            .parse::<Inventory>()
            .map_err(|e| format!("--devices: {e}"))?,
        None => HostReport::probe().inventory(),
    };
    let text = std::fs::read_to_string(&args.file)
        .map_err(|e| format!("cannot read `{}`: {e}", args.file.display()))?;
    let report = delivery::check(&text, &inventory);
    let code = if report.is_valid() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVALID)
    };
    if args.json {
        print_json(&report.to_json());
        return Ok(code);
    }
    let source = match &args.devices {
        Some(_) => "the stated devices",
        None => "this host",
    };
    say!(
        "{}: resolved against {source}: {inventory}",
        args.file.display()
    );
    for channel in &report.channels {
        let casts: Vec<String> = channel
            .spec
            .wire_dtype
            .iter()
            .map(|(from, to)| format!("{from} as {to}"))
            .collect();
        let mut extra = String::new();
        if !casts.is_empty() {
            extra += &format!(", sends {}", casts.join(" and "));
            if channel.spec.keep_wire_dtype {
                extra += " (delivered as sent)";
            }
        }
        if channel.spec.checksum {
            extra += ", checksums";
        }
        say!(
            "\n{}  ({}, fallback {}{extra})",
            channel.name,
            channel.spec.pattern,
            channel.spec.fallback
        );
        for (source, r) in &channel.resolved {
            say!(
                "  {:<8} -> {:<8} {}",
                source.to_string(),
                r.target.to_string(),
                r.reason
            );
        }
    }
    if report.is_valid() {
        say!("\nvalid: {} channel(s)", report.channels.len());
    } else {
        for e in &report.errors {
            eprintln!("error: {e}");
        }
        eprintln!("{}: {} error(s)", args.file.display(), report.errors.len());
    }
    Ok(code)
}
