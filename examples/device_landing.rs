//! Tensors sent from the host land on a GPU, cast to bf16 on the wire and
//! checksummed.
//!
//! The channel `/frames` maps the sender's `cpu` to `wgpu:0` (the first
//! adapter wgpu finds: Vulkan, Metal, DX12 or GL), sends `f32` tensors as
//! `bf16` (half the bytes travel; the receiver casts them back on the
//! adapter) and checksums every tensor (verified on the adapter after the
//! copy). Its fallback is `cpu`: on a host without a wgpu adapter the
//! tensors land in host memory instead, and the example says so. It runs on
//! a machine with a GPU and on one without.
//!
//! ```sh
//! cargo run --example device_landing
//! ```

use std::error::Error;
use std::time::Duration;

use tensorferry::kernels::runtime::HostReport;
use tensorferry::{
    ChannelConfig, ChannelSpec, DType, Device, DeviceMap, Fallback, Message, Node, Pattern, Tensor,
};

/// The channel as a configuration file would write it; [`channels`] builds
/// the same in code.
const CHANNELS_JSON: &str = r#"{"channels": {"/frames": {
    "device_map": {"cpu": "wgpu:0"},
    "fallback": "cpu",
    "wire_dtype": {"f32": "bf16"},
    "checksum": true
}}}"#;

const WAIT: Duration = Duration::from_secs(30);

/// Runs the example (see [`run`]).
pub fn main() -> Result<(), Box<dyn Error>> {
    run()?;
    Ok(())
}

/// Sends two tensors through `/frames` and returns the device each landed on.
pub fn run() -> Result<Vec<Device>, Box<dyn Error>> {
    let channels = channels()?;
    // The same channel read from JSON is the same configuration.
    if ChannelConfig::from_json_str(CHANNELS_JSON)? != channels {
        return Err("the JSON and the code describe different channels".into());
    }
    let spec = channels.channel("/frames")?;

    // What this host has, and where that makes the tensors land.
    let host = HostReport::probe();
    match &host.wgpu.unavailable {
        None => {
            let names: Vec<String> = host
                .wgpu
                .devices
                .iter()
                .map(|a| format!("wgpu:{} {} ({})", a.index, a.name, a.backend))
                .collect();
            println!("wgpu adapters: {}", names.join(", "));
        }
        Some(why) => println!(
            "no wgpu adapter here: {why}\nthe channel's fallback is `{}`",
            spec.fallback
        ),
    }
    let plan = spec.resolve(Device::Cpu, &host.inventory())?;
    println!("tensors from cpu land on {}: {}", plan.target, plan.reason);

    // Both ends use the same configuration: the sender casts and checksums,
    // the receiver lands, verifies and casts back.
    let receiver = Node::builder()
        .name("gpu-worker")
        .listen("tcp://127.0.0.1:0")
        .channels(channels.clone())
        .build()?;
    let addr = receiver.listen_addrs()[0].to_string();
    let frames = receiver.subscriber("/frames");
    let sender = Node::builder().name("camera").channels(channels).build()?;
    sender.connect(&addr)?;
    let publisher = sender.publisher("/frames");
    publisher.wait_for_subscribers(1, WAIT)?;

    // Values bf16 holds exactly, so they come back unchanged; the u8 mask
    // is not cast (the channel casts f32 only) but is checksummed too.
    let image: Vec<f32> = (0..64).map(|i| i as f32 * 0.25 - 4.0).collect();
    let mask: Vec<u8> = (0..64).map(|i| (i % 2) as u8).collect();
    publisher.send(
        Message::new()
            .field("frame", 1)
            .tensor("image", Tensor::from_slice(&image, &[8, 8])?)
            .tensor("mask", Tensor::from_slice(&mask, &[8, 8])?),
    )?;

    // `recv` returns the message with every tensor already on its target
    // device, its checksum verified there and its wire cast undone.
    let got = frames.recv_timeout(WAIT)?;
    let mut landed = Vec::new();
    for ((name, tensor), sent) in got.message.tensors().zip(&got.tensors) {
        let travelled = match sent.cast_from {
            Some(from) => format!("{from} sent as {}", sent.dtype),
            None => format!("{} as is", sent.dtype),
        };
        let checked = if sent.checksum.is_some() {
            "checksum verified"
        } else {
            "no checksum"
        };
        println!(
            "{name}: {} {:?} on {} (from {}, {travelled}, {checked})",
            tensor.dtype(),
            tensor.shape(),
            tensor.device(),
            sent.device,
        );
        if tensor.device() != plan.target {
            return Err(
                format!("{name} landed on {}, not {}", tensor.device(), plan.target).into(),
            );
        }
        landed.push(tensor.device());
    }

    // Reading the image back to the host shows the values survived the trip.
    let image_back = got.message.get("image").ok_or("no image")?.to_host()?;
    if image_back.dtype() != DType::F32 || image_back.as_slice::<f32>()? != image.as_slice() {
        return Err("the image changed on the way".into());
    }
    println!(
        "image read back from {}: {} values as sent",
        plan.target,
        image.len()
    );
    Ok(landed)
}

/// The channel configuration, built in code.
fn channels() -> tensorferry::Result<ChannelConfig> {
    let frames = ChannelSpec::new(Pattern::PubSub)
        .with_device_map(DeviceMap::builder().entry("cpu", "wgpu:0").build()?)
        .with_fallback(Fallback::Cpu)
        .with_wire_dtype("f32", "bf16")
        .with_checksum(true);
    let mut config = ChannelConfig::new();
    config.insert("/frames", frames)?;
    Ok(config)
}
