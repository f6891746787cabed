//! Device-mapped delivery: where tensors land, fallback policies, reverse
//! maps for replies, wire casts and checksums, on the host and on a wgpu
//! adapter (lavapipe in CI). Tests that need an adapter skip with a printed
//! reason when there is none, and fail instead under
//! `TENSORFERRY_REQUIRE_WGPU=1`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tensorferry_device_map::{
    ChannelConfig, ChannelSpec, Device, DeviceMap, Fallback, Inventory, Pattern,
};
use tensorferry_engine::delivery::{Delivery, Direction};
use tensorferry_engine::outbound::write_frame;
use tensorferry_engine::wire::{
    decode, encode, encode_staged, EncodeOptions, FrameMeta, Limits, Payload,
};
use tensorferry_engine::{DType, Error, HostBuffer, Message, Node, Service, Tensor, ALL_CHANNELS};
use tensorferry_kernels::cpu;
use tensorferry_kernels::runtime::{required, Runtime};

const WAIT: Duration = Duration::from_secs(20);

/// The wgpu adapter, or `None` (with the reason printed) when this host has none.
fn wgpu() -> Option<Runtime> {
    match Runtime::open(Device::wgpu(0)) {
        Ok(rt) => Some(rt),
        Err(e) if required("TENSORFERRY_REQUIRE_WGPU") => {
            panic!("TENSORFERRY_REQUIRE_WGPU=1 but wgpu:0 cannot be opened: {e}")
        }
        Err(e) => {
            println!("SKIP: wgpu:0: {e}");
            None
        }
    }
}

/// A small xorshift generator: fresh data every run unless the seed is pinned.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        println!("rng seed {seed}");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// `n` f32 values: random bits, with NaN, ±inf, subnormals, ±0 and values
    /// that round to a tie mixed in.
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        let specials = [
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(1),
            -f32::from_bits(0x0040_0000),
            0.0,
            -0.0,
            f32::from_bits(0x3f80_8000),
            f32::MAX,
        ];
        (0..n)
            .map(|i| match self.next() % 4 {
                0 => specials[i % specials.len()],
                1 => f32::from_bits(self.next() as u32),
                _ => (self.next() % 20_000) as f32 / 7.0 - 1000.0,
            })
            .collect()
    }
}

fn stager(spec: &ChannelSpec, direction: Direction, inventory: &str) -> Delivery {
    let inventory: Inventory = inventory.parse().expect("inventory");
    Delivery::new(spec, direction, Some(Arc::new(inventory))).expect("stager")
}

/// Sends `message` through `from` (prepare + encode), the bytes of a frame,
/// and `to` (decode + land), as two hosts would.
fn travel(from: &Delivery, to: &Delivery, message: &Message) -> Result<(Message, u64), Error> {
    let (wire, origins) = from.prepare(message)?;
    let frame = encode_staged(
        &wire,
        &origins,
        &FrameMeta::message("/t", 0),
        EncodeOptions::default(),
    )?;
    let mut bytes = Vec::new();
    write_frame(&frame, &mut bytes).expect("write");
    let got = decode(&HostBuffer::copy_from(&bytes), &Limits::default())?;
    let wire_bytes = got.tensors.iter().map(|i| i.bytes).sum();
    Ok((to.land(got.message, &got.tensors)?.0, wire_bytes))
}

fn bytes_of(t: &Tensor) -> Vec<u8> {
    t.to_host()
        .expect("to host")
        .packed()
        .expect("packed")
        .as_slice()
        .to_vec()
}

/// `values` cast f32 → `wire` → f32 by the CPU reference.
fn through(values: &[f32], wire: DType) -> Vec<u8> {
    let src: &[u8] = bytemuck::cast_slice(values);
    let mut mid = vec![0u8; values.len() * wire.size_bytes()];
    cpu::cast(src, DType::F32, &mut mid, wire).expect("cast");
    let mut back = vec![0u8; src.len()];
    cpu::cast(&mid, wire, &mut back, DType::F32).expect("cast back");
    back
}

#[test]
fn wire_dtype_halves_the_bytes_and_casts_back_like_the_cpu_reference() {
    let mut rng = Rng::new();
    let spec = ChannelSpec::new(Pattern::PubSub).with_wire_dtype("f32", "bf16");
    for n in [0usize, 1, 3, 1023, 4097] {
        let values = rng.f32s(n);
        let m = Message::new()
            .tensor("x", Tensor::from_slice(&values, &[n]).expect("x"))
            .tensor("k", Tensor::from_slice(&[7u8; 5], &[5]).expect("k"));
        let s = stager(&spec, Direction::Forward, "cpu");
        let (got, wire_bytes) = travel(&s, &s, &m).expect("travel");
        assert_eq!(
            wire_bytes,
            (n * 2 + 5) as u64,
            "bf16 on the wire, u8 untouched"
        );
        let x = got.get("x").expect("x");
        assert_eq!((x.dtype(), x.device()), (DType::F32, Device::Cpu));
        assert_eq!(bytes_of(x), through(&values, DType::BF16), "n = {n}");
        assert_eq!(bytes_of(got.get("k").expect("k")), [7u8; 5]);

        let mut keep = spec.clone();
        keep.keep_wire_dtype = true;
        let r = stager(&keep, Direction::Forward, "cpu");
        let (got, _) = travel(&s, &r, &m).expect("travel");
        let x = got.get("x").expect("x");
        assert_eq!(x.dtype(), DType::BF16, "kept in its wire dtype");
        let mut want = vec![0u8; n * 2];
        cpu::cast(
            bytemuck::cast_slice(&values),
            DType::F32,
            &mut want,
            DType::BF16,
        )
        .expect("cast");
        assert_eq!(bytes_of(x), want);
    }
}

#[test]
fn a_wire_cast_the_receiving_channel_does_not_name_is_refused() {
    let sender = ChannelSpec::new(Pattern::PubSub).with_wire_dtype("f64", "bf16");
    let from = stager(&sender, Direction::Forward, "cpu");
    let to = stager(
        &ChannelSpec::new(Pattern::PubSub),
        Direction::Forward,
        "cpu",
    );
    let m = Message::new().tensor("w", Tensor::from_slice(&[1.0f64, 2.0], &[2]).expect("w"));
    let err = travel(&from, &to, &m).expect_err("not named here");
    let text = err.to_string();
    assert!(
        text.contains("`w`") && text.contains(r#"{"f64": "bf16"}"#),
        "{text}"
    );
    // Named on both ends, it travels and comes back as f64.
    let (got, _) = travel(&from, &from, &m).expect("named");
    assert_eq!(
        got.get("w").expect("w").as_slice::<f64>().expect("f64"),
        &[1.0, 2.0]
    );
}

#[test]
fn a_corrupted_tensor_is_rejected_by_its_checksum_and_nothing_is_delivered() {
    let spec = ChannelSpec::new(Pattern::PubSub).with_checksum(true);
    let s = stager(&spec, Direction::Forward, "cpu");
    let m = Message::new()
        .tensor("a", Tensor::from_slice(&[1u32, 2, 3], &[3]).expect("a"))
        .tensor("b", Tensor::from_slice(&[9.5f32; 100], &[100]).expect("b"));
    let (wire, origins) = s.prepare(&m).expect("prepare");
    assert!(origins.iter().all(|o| o.checksum.is_some()));
    let frame = encode_staged(
        &wire,
        &origins,
        &FrameMeta::message("/t", 0),
        EncodeOptions::default(),
    )
    .expect("encode");
    let mut bytes = Vec::new();
    write_frame(&frame, &mut bytes).expect("write");
    let last = bytes.len() - 64; // inside `b`'s 400 bytes (padding follows them)
    bytes[last - 100] ^= 0x10;
    let got = decode(&HostBuffer::copy_from(&bytes), &Limits::default()).expect("decode");
    let err = s.land(got.message, &got.tensors).expect_err("mismatch");
    let text = err.to_string();
    assert!(
        text.contains("`b`") && text.contains("checksum mismatch"),
        "{text}"
    );

    // A receiver that requires checksums rejects a frame without them.
    let plain = stager(
        &ChannelSpec::new(Pattern::PubSub),
        Direction::Forward,
        "cpu",
    );
    let err = travel(&plain, &s, &m).expect_err("no checksums");
    assert!(err.to_string().contains("requires checksums"), "{err}");
}

#[test]
fn a_checksummed_frame_with_any_bit_of_its_head_flipped_is_refused() {
    // Tensor checksums are worth what the header that places them is: a
    // flipped sequence number, channel, name or dtype would otherwise pass
    // with every checksum intact. Frames that carry checksums seal their
    // head too, and every single-bit flip of it is refused.
    let spec = ChannelSpec::new(Pattern::PubSub).with_checksum(true);
    let s = stager(&spec, Direction::Forward, "cpu");
    let m = Message::new()
        .field("step", 7)
        .tensor("a", Tensor::from_slice(&[1u32, 2, 3], &[3]).expect("a"))
        .tensor("b", Tensor::from_slice(&[9.5f32; 100], &[100]).expect("b"));
    let (wire, origins) = s.prepare(&m).expect("prepare");
    for compact in [true, false] {
        let opts = EncodeOptions {
            compact,
            ..EncodeOptions::default()
        };
        let frame =
            encode_staged(&wire, &origins, &FrameMeta::message("/t", 41), opts).expect("encode");
        let mut bytes = Vec::new();
        write_frame(&frame, &mut bytes).expect("write");
        let good = decode(&HostBuffer::copy_from(&bytes), &Limits::default()).expect("decode");
        assert_eq!(good.meta.seq, 41);
        let head = frame.head().len();
        for at in 0..head {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[at] ^= 1 << bit;
                if let Ok(f) = decode(&HostBuffer::copy_from(&bad), &Limits::default()) {
                    panic!(
                        "bit {bit} of head byte {at} flipped (compact: {}) decoded as {:?} seq {}",
                        opts.compact, f.meta.channel, f.meta.seq
                    );
                }
            }
        }
    }
    // Frames without checksums are not sealed: their prelude is unchanged.
    let plain = encode(&m, &FrameMeta::message("/t", 1), EncodeOptions::default()).expect("encode");
    assert_eq!(&plain.head()[6..8], &[0, 0], "no flag");
    assert_eq!(&plain.head()[24..32], &[0u8; 8], "no seal");
}

#[test]
fn fallback_policies_decide_where_a_missing_target_lands() {
    let map = DeviceMap::builder()
        .entry("cpu", "cuda:0")
        .build()
        .expect("map");
    let m = Message::new().tensor("x", Tensor::from_slice(&[1.0f32, 2.0], &[2]).expect("x"));
    let plain = stager(
        &ChannelSpec::new(Pattern::PubSub),
        Direction::Forward,
        "cpu",
    );
    for (fallback, inventory, want) in [
        (Fallback::Cpu, "cpu", Some(Device::Cpu)),
        (Fallback::Wgpu, "cpu", Some(Device::Cpu)),
        (Fallback::Error, "cpu", None),
        (Fallback::Error, "cpu,cuda:1", None),
    ] {
        let spec = ChannelSpec::new(Pattern::PubSub)
            .with_device_map(map.clone())
            .with_fallback(fallback);
        let to = stager(&spec, Direction::Forward, inventory);
        match (travel(&plain, &to, &m), want) {
            (Ok((got, _)), Some(device)) => {
                let x = got.get("x").expect("x");
                assert_eq!(x.device(), device, "{fallback} on {inventory}");
                assert_eq!(x.as_slice::<f32>().expect("f32"), &[1.0, 2.0]);
            }
            (Err(e), None) => {
                let text = e.to_string();
                assert!(
                    text.contains("`x`") && text.contains("cuda:0") && text.contains("fallback"),
                    "{text}"
                );
            }
            (other, want) => panic!("{fallback} on {inventory}: {other:?}, wanted {want:?}"),
        }
    }
}

#[test]
fn tensors_land_on_a_wgpu_adapter_verified_and_cast_back_there() {
    let Some(_rt) = wgpu() else { return };
    let mut rng = Rng::new();
    let spec = ChannelSpec::new(Pattern::PubSub)
        .with_device_map(
            DeviceMap::builder()
                .entry("cpu", "wgpu:0")
                .build()
                .expect("map"),
        )
        .with_wire_dtype("f32", "f16")
        .with_checksum(true);
    let from = stager(&spec, Direction::Forward, "cpu");
    let to = stager(&spec, Direction::Forward, "cpu,wgpu:0");
    for n in [1usize, 5, 1000, 70_001] {
        let values = rng.f32s(n);
        let m = Message::new().tensor("x", Tensor::from_slice(&values, &[n]).expect("x"));
        let (got, wire_bytes) = travel(&from, &to, &m).expect("travel");
        assert_eq!(wire_bytes, (n * 2) as u64);
        let x = got.get("x").expect("x");
        assert_eq!((x.device(), x.dtype()), (Device::wgpu(0), DType::F32));
        assert_eq!(bytes_of(x), through(&values, DType::F16), "n = {n}");
    }

    // A prefix view of a larger device buffer travels as exactly its own
    // bytes: cast and checksummed as the view, not the whole buffer.
    let values = rng.f32s(1000);
    let whole = Tensor::from_slice(&values, &[1000])
        .expect("x")
        .to_runtime(&Runtime::open(Device::wgpu(0)).expect("wgpu"))
        .expect("upload");
    let view = whole.narrow(0, 0, 777).expect("narrow");
    let spec_back = ChannelSpec::new(Pattern::PubSub)
        .with_device_map(
            DeviceMap::builder()
                .entry("wgpu:0", "cpu")
                .build()
                .expect("map"),
        )
        .with_wire_dtype("f32", "bf16")
        .with_checksum(true);
    let (got, wire_bytes) = travel(
        &stager(&spec_back, Direction::Forward, "cpu,wgpu:0"),
        &stager(&spec_back, Direction::Forward, "cpu"),
        &Message::new().tensor("v", view),
    )
    .expect("a view travels");
    assert_eq!(wire_bytes, 777 * 2);
    assert_eq!(
        bytes_of(got.get("v").expect("v")),
        through(&values[..777], DType::BF16)
    );

    // A CUDA target on a host without CUDA: the wgpu fallback picks the adapter.
    let spec = ChannelSpec::new(Pattern::PubSub)
        .with_device_map(
            DeviceMap::builder()
                .entry("cpu", "cuda:1")
                .build()
                .expect("map"),
        )
        .with_fallback(Fallback::Wgpu);
    let to = stager(&spec, Direction::Forward, "cpu,wgpu:0");
    let m = Message::new().tensor("x", Tensor::from_slice(&[5i32; 9], &[3, 3]).expect("x"));
    let (got, _) = travel(&from, &to, &m).expect("travel");
    let x = got.get("x").expect("x");
    assert_eq!((x.device(), x.shape()), (Device::wgpu(0), &[3, 3][..]));
    assert_eq!(bytes_of(x), bytemuck::cast_slice::<i32, u8>(&[5; 9]));

    // And from the adapter: cast and checksummed there, landing on the host.
    let back = ChannelSpec::new(Pattern::PubSub)
        .with_device_map(
            DeviceMap::builder()
                .entry("wgpu:0", "cpu")
                .build()
                .expect("map"),
        )
        .with_wire_dtype("f32", "bf16")
        .with_checksum(true);
    let values = rng.f32s(3001);
    let on_gpu = Tensor::from_slice(&values, &[3001])
        .expect("x")
        .to_runtime(&Runtime::open(Device::wgpu(0)).expect("wgpu"))
        .expect("upload");
    let m = Message::new().tensor("x", on_gpu);
    let sender = stager(&back, Direction::Forward, "cpu,wgpu:0");
    let (wire, origins) = sender.prepare(&m).expect("prepare");
    let x = wire.get("x").expect("x");
    assert_eq!(
        (x.device(), x.dtype(), origins[0].device),
        (Device::wgpu(0), DType::BF16, Device::wgpu(0)),
        "cast on the adapter, and kept there until the frame is written"
    );
    let frame = encode_staged(
        &wire,
        &origins,
        &FrameMeta::message("/t", 0),
        EncodeOptions::default(),
    )
    .expect("encode");
    assert!(matches!(frame.buffers()[0], Payload::Device(_)));
    let receiver = stager(&back, Direction::Forward, "cpu");
    let (got, _) = travel(&sender, &receiver, &m).expect("travel");
    let x = got.get("x").expect("x");
    assert_eq!((x.device(), x.dtype()), (Device::Cpu, DType::F32));
    assert_eq!(bytes_of(x), through(&values, DType::BF16));
}

/// A node pair over TCP whose server runs `/gpu` with `spec` and echoes each
/// request's tensor, recording the device it arrived on.
fn echo_pair(spec: &ChannelSpec) -> (Node, Node, String, Arc<Mutex<Vec<Device>>>) {
    let mut config = ChannelConfig::new();
    config.insert("/gpu", spec.clone()).expect("config");
    let server = Node::builder()
        .name("server")
        .channels(config.clone())
        .listen("tcp://127.0.0.1:0")
        .build()
        .expect("server");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    server
        .serve(
            "/gpu",
            Service::new(move |m: Message| {
                let x = m.get("x").expect("x").clone();
                log.lock().expect("log").push(x.device());
                Ok(Message::new().tensor("y", x))
            }),
        )
        .expect("serve");
    let addr = server.listen_addrs()[0].to_string();
    let client = Node::builder()
        .name("client")
        .channels(config)
        .build()
        .expect("client");
    (server, client, addr, seen)
}

#[test]
fn replies_travel_back_with_the_reverse_map() {
    let Some(rt) = wgpu() else { return };
    let data: Vec<f32> = (0..777).map(|i| i as f32 * 0.5).collect();

    // Requests from the host land on wgpu:0; replies computed there come back to the host.
    let spec = ChannelSpec::new(Pattern::ReqRep).with_device_map(
        DeviceMap::builder()
            .entry("cpu", "wgpu:0")
            .build()
            .expect("map"),
    );
    let (_server, client, addr, seen) = echo_pair(&spec);
    let x = Tensor::from_slice(&data, &[777]).expect("x");
    let reply = client
        .request(&addr, "/gpu", Message::new().tensor("x", x.clone()), WAIT)
        .expect("reply");
    assert_eq!(*seen.lock().expect("log"), [Device::wgpu(0)]);
    let y = reply.get("y").expect("y");
    assert_eq!(y.device(), Device::Cpu, "back where the request came from");
    assert_eq!(y.as_slice::<f32>().expect("f32"), &data[..]);

    // Requests from wgpu:0 land on the host; replies return to wgpu:0.
    let spec = ChannelSpec::new(Pattern::ReqRep).with_device_map(
        DeviceMap::builder()
            .entry("wgpu:0", "cpu")
            .build()
            .expect("map"),
    );
    let (_server, client, addr, seen) = echo_pair(&spec);
    let on_gpu = x.to_runtime(&rt).expect("upload");
    let reply = client
        .request(&addr, "/gpu", Message::new().tensor("x", on_gpu), WAIT)
        .expect("reply");
    assert_eq!(*seen.lock().expect("log"), [Device::Cpu]);
    let y = reply.get("y").expect("y");
    assert_eq!(y.device(), Device::wgpu(0));
    assert_eq!(bytes_of(y), bytemuck::cast_slice::<f32, u8>(&data));
}

#[test]
fn inproc_tensors_on_their_target_device_move_by_reference() {
    let Some(rt) = wgpu() else { return };
    let name = format!("staging-{}", std::process::id());
    let server = Node::builder()
        .name("a")
        .listen(format!("inproc://{name}"))
        .build()
        .expect("a");
    let client = Node::builder().name("b").build().expect("b");
    let sub = client
        .subscribe(&format!("inproc://{name}"), "/gpu")
        .expect("subscribe");
    let publisher = server.publisher("/gpu");
    publisher.wait_for_subscribers(1, WAIT).expect("subscriber");
    let x = Tensor::from_slice(&[3u16; 99], &[99])
        .expect("x")
        .to_runtime(&rt)
        .expect("upload");
    publisher
        .send(Message::new().tensor("x", x.clone()))
        .expect("send");
    let got = sub.recv_timeout(WAIT).expect("message");
    let y = got.message.get("x").expect("x");
    assert_eq!(y.device(), Device::wgpu(0));
    assert!(
        Arc::ptr_eq(
            x.device_buffer().expect("device"),
            y.device_buffer().expect("device")
        ),
        "same device: the buffer is shared, not copied"
    );
}

#[test]
fn a_rejected_message_leaves_the_subscription_working() {
    let mut config = ChannelConfig::new();
    config
        .insert(
            "/bad",
            ChannelSpec::new(Pattern::PubSub).with_device_map(
                DeviceMap::builder()
                    .entry("cpu", "cuda:7")
                    .build()
                    .expect("map"),
            ),
        )
        .expect("config");
    let server = Node::builder()
        .listen("tcp://127.0.0.1:0")
        .build()
        .expect("server");
    let addr = server.listen_addrs()[0].to_string();
    let client = Node::builder()
        .channels(config)
        .inventory(Inventory::cpu_only())
        .build()
        .expect("client");
    let sub = client.subscribe(&addr, ALL_CHANNELS).expect("subscribe");
    let (bad, good) = (server.publisher("/bad"), server.publisher("/good"));
    bad.wait_for_subscribers(1, WAIT).expect("subscriber");
    let m = Message::new().tensor("x", Tensor::from_slice(&[1i64, 2], &[2]).expect("x"));
    bad.send(m.clone()).expect("send");
    good.send(m).expect("send");
    let err = sub.recv_timeout(WAIT).expect_err("no cuda:7 here");
    assert!(err.to_string().contains("cuda:7"), "{err}");
    // The message is named: its channel, its sequence number, the tensor.
    assert!(
        matches!(&err, Error::Undelivered { channel, seq: 0, .. } if channel == "/bad"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("message 0 on `/bad`") && err.to_string().contains("`x`"),
        "{err}"
    );
    let ok = sub.recv_timeout(WAIT).expect("the next message");
    assert_eq!(ok.channel, "/good");
    assert_eq!(
        ok.message
            .get("x")
            .expect("x")
            .as_slice::<i64>()
            .expect("i64"),
        &[1, 2]
    );
}

#[test]
fn bad_wire_dtypes_are_refused_when_the_node_is_built() {
    let config = ChannelConfig::from_json_str(
        r#"{"channels": {"/a": {"wire_dtype": {"f32": "u8", "f64": "bf16", "f16": "nope"}},
            "/b": {"wire_dtype": {"f32": "bf16", "float": "f16"}}}}"#,
    )
    .expect("parses: the dtypes are checked by the engine");
    let Err(err) = Node::builder().channels(config).build() else {
        panic!("a node with bad wire dtypes was built");
    };
    let text = err.to_string();
    for want in [
        r#"channels["/a"].wire_dtype["f32"]"#,
        r#"channels["/a"].wire_dtype["f16"]"#,
        r#"channels["/b"].wire_dtype["float"]"#,
    ] {
        assert!(text.contains(want), "{want} in {text}");
    }
    assert!(
        !text.contains(r#"wire_dtype["f64"]"#),
        "f64 → bf16 is fine: {text}"
    );
}

#[test]
fn tcp_frames_read_device_bound_tensors_straight_into_the_adapter() {
    let Some(rt) = wgpu() else { return };
    let mut rng = Rng::new();
    // Host tensors go to the adapter, adapter tensors to the host: one frame
    // interleaves buffers read into the adapter with buffers read to memory.
    let spec = ChannelSpec::new(Pattern::PubSub)
        .with_device_map(
            DeviceMap::builder()
                .entry("cpu", "wgpu:0")
                .entry("wgpu:0", "cpu")
                .build()
                .expect("map"),
        )
        .with_wire_dtype("f32", "bf16")
        .with_checksum(true);
    let mut config = ChannelConfig::new();
    config.insert("/mix", spec).expect("config");
    let server = Node::builder()
        .channels(config.clone())
        .listen("tcp://127.0.0.1:0")
        .build()
        .expect("server");
    let addr = server.listen_addrs()[0].to_string();
    let client = Node::builder().channels(config).build().expect("client");
    let sub = client.subscribe(&addr, "/mix").expect("subscribe");
    let publisher = server.publisher("/mix");
    publisher.wait_for_subscribers(1, WAIT).expect("subscriber");
    // 6 MiB on the wire: past one wgpu staging step, so it is read straight in.
    let big = rng.f32s((12 << 20) / 4 + 3);
    let small: Vec<u8> = (0..1001).map(|i| (i * 7) as u8).collect();
    let back = rng.f32s(4099);
    let m = Message::new()
        .tensor("big", Tensor::from_slice(&big, &[big.len()]).expect("big"))
        .tensor("small", Tensor::from_slice(&small, &[1001]).expect("small"))
        .tensor(
            "back",
            Tensor::from_slice(&back, &[4099])
                .expect("back")
                .to_runtime(&rt)
                .expect("upload"),
        );
    for _ in 0..3 {
        publisher.send(m.clone()).expect("send");
    }
    for _ in 0..3 {
        let got = sub.recv_timeout(WAIT).expect("message");
        let t = |n: &str| got.message.get(n).expect("tensor").clone();
        assert_eq!(
            (t("big").device(), t("big").dtype()),
            (Device::wgpu(0), DType::F32)
        );
        assert_eq!(bytes_of(&t("big")), through(&big, DType::BF16));
        assert_eq!(t("small").device(), Device::wgpu(0));
        assert_eq!(bytes_of(&t("small")), small);
        assert_eq!(
            (t("back").device(), t("back").dtype()),
            (Device::Cpu, DType::F32)
        );
        assert_eq!(bytes_of(&t("back")), through(&back, DType::BF16));
    }
}
