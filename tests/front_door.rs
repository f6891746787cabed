//! An embedder's program written with `tensorferry`'s top-level names alone
//! (no `tensorferry::engine::…` paths): publish/subscribe, a service, a
//! recording replayed through `file://`, and a device map resolution. If a
//! name an embedder needs stops being re-exported, this stops compiling.

use std::time::Duration;

use tensorferry::{
    ChannelConfig, ChannelSpec, DType, Device, DeviceMap, Error, Fallback, Inventory, Message,
    Node, Pattern, Received, Recording, Result, Schema, Service, ServiceError, Subscription,
    Tensor, ALL_CHANNELS,
};

const WAIT: Duration = Duration::from_secs(10);

/// A node listening on a port the system picks, and the address it got.
fn listening(name: &str) -> Result<(Node, String)> {
    let node = Node::builder()
        .name(name)
        .listen("tcp://127.0.0.1:0")
        .build()?;
    let addr = node.listen_addrs()[0].to_string();
    Ok((node, addr))
}

#[test]
fn publish_and_subscribe_between_two_nodes() -> Result<()> {
    let (camera, addr) = listening("camera")?;
    let viewer = Node::builder().name("viewer").build()?;
    let frames: Subscription = viewer.subscribe(&addr, "/camera")?;
    let publisher = camera.publisher("/camera");
    publisher.wait_for_subscribers(1, WAIT)?;

    let image = Tensor::from_slice(&[7u8; 24], &[2, 4, 3])?;
    let depth = Tensor::from_slice(&[1.5f64, -2.0], &[2])?;
    publisher.send(
        Message::new()
            .field("frame", 3)
            .tensor("image", image)
            .tensor("depth", depth),
    )?;

    let got: Received = frames.recv_timeout(WAIT)?;
    assert_eq!(got.channel, "/camera");
    assert_eq!(got.message.get_field("frame"), Some(&serde_json::json!(3)));
    let image = got.message.get("image").expect("image arrives");
    assert_eq!((image.dtype(), image.shape()), (DType::U8, &[2, 4, 3][..]));
    assert_eq!(image.device(), Device::Cpu);
    let depth = got.message.get("depth").expect("depth arrives");
    assert_eq!(depth.as_slice::<f64>()?, &[1.5, -2.0][..]);
    assert_eq!(camera.stats().messages_sent, 1);
    assert!(viewer.channel_stats("/camera").messages_received >= 1);
    Ok(())
}

#[test]
fn a_service_answers_and_its_schema_rejects() -> Result<()> {
    let (server, addr) = listening("adder")?;
    let add = |request: Message| -> std::result::Result<Message, ServiceError> {
        let sum: f32 = request
            .get("x")
            .ok_or_else(|| ServiceError::new("bad_input", "no `x`"))?
            .as_slice::<f32>()
            .map_err(|e| ServiceError::new("bad_input", e.to_string()))?
            .iter()
            .sum();
        Ok(Message::new().field("sum", sum))
    };
    let input = Schema::new().tensor("x", DType::F32, "*")?;
    let output = Schema::new().field("sum");
    server.serve("/sum", Service::new(add).input(input).output(output))?;

    let client = Node::builder().name("client").build()?;
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.5], &[3])?;
    let reply = client.request(&addr, "/sum", Message::new().tensor("x", x), WAIT)?;
    assert_eq!(reply.get_field("sum"), Some(&serde_json::json!(6.5)));

    let not_a_vector = Tensor::from_slice(&[1.0f32; 4], &[2, 2])?;
    let refused = client.request(
        &addr,
        "/sum",
        Message::new().tensor("x", not_a_vector),
        WAIT,
    );
    match refused {
        Err(Error::Remote { code, .. }) => assert_eq!(code, "bad_request"),
        other => panic!("expected a bad_request reply, got {other:?}"),
    }
    Ok(())
}

#[test]
fn a_recording_replays_through_a_file() -> Result<()> {
    let path =
        std::env::temp_dir().join(format!("tensorferry-front-door-{}.tfm", std::process::id()));
    let file = format!("file://{}", path.display());

    let node = Node::builder().name("recorder").build()?;
    let recording: Recording = node.record(&file, ALL_CHANNELS)?;
    let publisher = node.publisher("/steps");
    for step in 0..3i64 {
        let grad = Tensor::from_slice(&[step as f32; 4], &[2, 2])?;
        publisher.send(Message::new().field("step", step).tensor("grad", grad))?;
    }
    assert_eq!(recording.stop()?, 3);

    let replay = node.subscribe(&file, "/steps")?;
    let mut steps = Vec::new();
    for received in replay.iter() {
        let received = received?;
        let grad = received.message.get("grad").expect("grad recorded");
        assert_eq!(grad.shape(), &[2, 2]);
        steps.push(received.message.get_field("step").cloned());
    }
    let _ = std::fs::remove_file(&path);
    let want: Vec<_> = (0..3).map(|s| Some(serde_json::json!(s))).collect();
    assert_eq!(steps, want);
    Ok(())
}

#[test]
fn a_device_map_resolves_against_the_host() -> Result<()> {
    let config = ChannelConfig::from_json_str(
        r#"{"channels": {"/camera": {"device_map": {"cpu": "cuda:0"}, "fallback": "cpu"}}}"#,
    )?;
    let on_cpu_host = config
        .channel("/camera")?
        .resolve(Device::Cpu, &Inventory::cpu_only())?;
    assert_eq!(on_cpu_host.target, Device::Cpu);
    let with_gpu: Inventory = "cuda:0".parse()?;
    let on_gpu_host = config.channel("/camera")?.resolve(Device::Cpu, &with_gpu)?;
    assert_eq!(on_gpu_host.target, Device::cuda(0));

    // The same channel built in code, and a node that accepts it.
    let spec = ChannelSpec::new(Pattern::PubSub)
        .with_device_map(DeviceMap::builder().entry("cpu", "gpu:0").build()?)
        .with_fallback(Fallback::Cpu);
    assert_eq!(
        spec.resolve(Device::Cpu, &with_gpu)?.target,
        Device::cuda(0)
    );
    let mut in_code = ChannelConfig::new();
    in_code.insert("/camera", spec)?;
    let node = Node::builder()
        .channels(in_code)
        .inventory(Inventory::cpu_only())
        .build()?;
    assert_eq!(node.name(), "tensorferry");
    Ok(())
}
