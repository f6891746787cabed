//! Read a channel configuration and ask where tensors from each device land.
//!
//! For every channel of the file, where tensors sent from `cpu`, `cuda:0`
//! and `cuda:1` land on a host with the given devices, and why (or the
//! error, under `"fallback": "error"`).
//!
//! ```sh
//! cargo run --example device_map -- examples/channels.json cuda:0,wgpu:0
//! ```

use std::error::Error;

use tensorferry::{ChannelConfig, Device, Inventory};

/// Resolves the file and host named on the command line (defaults: `examples/channels.json`, `cuda:0`).
pub fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .unwrap_or_else(|| "examples/channels.json".to_string());
    let host = args.next().unwrap_or_else(|| "cuda:0".to_string());
    run(&path, &host)
}

/// Prints the landing of each source device for every channel of the file
/// at `path`, on a host with the devices listed in `host` (`cuda:0,wgpu:0`).
pub fn run(path: &str, host: &str) -> Result<(), Box<dyn Error>> {
    let host: Inventory = host.parse()?;
    let config = ChannelConfig::from_file(path)?;
    for (name, spec) in config.iter() {
        println!("{name} ({}):", spec.pattern);
        for source in [Device::Cpu, Device::cuda(0), Device::cuda(1)] {
            match spec.resolve(source, &host) {
                Ok(r) => println!("  {source} -> {} ({})", r.target, r.reason),
                Err(e) => println!("  {source}: {e}"),
            }
        }
    }
    Ok(())
}
