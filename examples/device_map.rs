//! Read a channel configuration and ask where tensors from each device land.
//!
//! ```sh
//! cargo run --example device_map -- examples/channels.json cuda:0,wgpu:0
//! ```

use tensorferry::{ChannelConfig, Device, Inventory};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .unwrap_or_else(|| "examples/channels.json".to_string());
    let host: Inventory = args
        .next()
        .unwrap_or_else(|| "cuda:0".to_string())
        .parse()?;

    let config = ChannelConfig::from_file(&path)?;
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
