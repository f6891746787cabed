//! `tensorferry devices`: what this host has.

use std::process::ExitCode;

use tensorferry_kernels::runtime::HostReport;

use super::{human_bytes, print_json, Outcome};

/// Options of `tensorferry devices`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object (`cpu`, `cuda`, `wgpu`, `inventory`) instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> Outcome {
    let host = HostReport::probe();
    let inventory = host.inventory();
    if args.json {
        let mut value = serde_json::to_value(&host).map_err(|e| e.to_string())?;
        value["inventory"] = inventory.iter().map(|d| d.to_string()).collect();
        print_json(&value);
        return Ok(ExitCode::SUCCESS);
    }
    let memory = host
        .cpu
        .memory_bytes
        .map_or_else(|| "memory unknown".to_string(), human_bytes);
    say!(
        "cpu      {} ({} cores, {memory})",
        host.cpu.model,
        host.cpu.cores
    );
    match &host.cuda.unavailable {
        Some(why) if host.cuda.devices.is_empty() => say!("cuda     none: {why}"),
        _ => {
            for d in &host.cuda.devices {
                say!(
                    "cuda:{:<3} {} ({})",
                    d.index,
                    d.name,
                    human_bytes(d.memory_bytes)
                );
            }
        }
    }
    match &host.wgpu.unavailable {
        Some(why) if host.wgpu.devices.is_empty() => say!("wgpu     none: {why}"),
        _ => {
            for a in &host.wgpu.devices {
                let driver = if a.driver.is_empty() {
                    String::new()
                } else {
                    format!(", {}", a.driver)
                };
                say!(
                    "wgpu:{:<3} {} ({}, {}{driver})",
                    a.index,
                    a.name,
                    a.backend,
                    a.device_type
                );
            }
        }
    }
    say!("inventory: {inventory}");
    Ok(ExitCode::SUCCESS)
}
