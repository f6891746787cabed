//! Publish tensors from one node and receive them in another, over TCP.
//!
//! A `sensor` node listens on a port the system picks and publishes on
//! `/sensors`; a `consumer` node connects to it and subscribes. Each message
//! carries JSON fields and tensors of several dtypes and shapes, and the
//! consumer checks every one. Then a short burst of 1 MiB messages, received
//! on another thread, measures throughput.
//!
//! ```sh
//! cargo run --example pubsub
//! ```

use std::error::Error;
use std::thread;
use std::time::{Duration, Instant};

use tensorferry::{DType, Message, Node, Tensor};

/// How long any one step may wait before the example gives up.
const WAIT: Duration = Duration::from_secs(10);

/// Publishes a few checked readings and a timed burst from one node to another.
pub fn main() -> Result<(), Box<dyn Error>> {
    // The publishing side listens; port 0 lets the system pick a free port,
    // and `listen_addrs` says which one it got.
    let sensor = Node::builder()
        .name("sensor")
        .listen("tcp://127.0.0.1:0")
        .build()?;
    let addr = sensor.listen_addrs()[0].to_string();
    println!("sensor listening on {addr}");

    // The receiving side connects and subscribes (in a real deployment, in
    // another process or on another host).
    let consumer = Node::builder().name("consumer").build()?;
    let readings = consumer.subscribe(&addr, "/sensors")?;

    // Subscribing over TCP takes a round trip; until the publisher has heard
    // of the subscriber, what it sends goes to no one.
    let publisher = sensor.publisher("/sensors");
    publisher.wait_for_subscribers(1, WAIT)?;

    for step in 0..3 {
        publisher.send(reading(step)?)?;
    }
    for step in 0..3 {
        let got = readings.recv_timeout(WAIT)?;
        check(step, &got.message)?;
        let tensors: Vec<String> = got
            .message
            .tensors()
            .map(|(name, t)| format!("{name}: {} {:?} on {}", t.dtype(), t.shape(), t.device()))
            .collect();
        println!(
            "#{} from {}: {} ({})",
            got.seq,
            got.from,
            serde_json::Value::Object(got.message.fields().clone()),
            tensors.join(", ")
        );
    }

    // A burst: one 1 MiB tensor per message. Cloning a tensor shares its
    // bytes, and sending writes them to the socket without copying them
    // into a frame first.
    const COUNT: usize = 64;
    let payload = Tensor::zeros(DType::F32, &[256, 1024])?;
    let bytes_each = payload.size_bytes();
    // The consumer takes the messages on its own thread, as a receiving
    // process would.
    let receiver = thread::spawn(move || -> tensorferry::Result<usize> {
        let mut bytes = 0;
        for _ in 0..COUNT {
            let got = readings.recv_timeout(WAIT)?;
            bytes += got.message.payload_bytes() as usize;
        }
        Ok(bytes)
    });
    let start = Instant::now();
    for i in 0..COUNT {
        let message = Message::new()
            .field("i", i)
            .tensor("payload", payload.clone());
        publisher.send(message)?;
    }
    let received = receiver
        .join()
        .expect("the receiving thread runs to the end")?;
    let secs = start.elapsed().as_secs_f64();
    if received != COUNT * bytes_each {
        return Err(format!("received {received} bytes, sent {}", COUNT * bytes_each).into());
    }
    println!(
        "burst: {COUNT} messages of {} KiB over tcp in {:.1} ms: {:.2} GB/s, {:.0} messages/s",
        bytes_each / 1024,
        secs * 1e3,
        received as f64 / secs / 1e9,
        COUNT as f64 / secs
    );
    Ok(())
}

/// Message number `step`: fields, and tensors of three dtypes and shapes.
fn reading(step: u32) -> tensorferry::Result<Message> {
    let s = step as f32;
    // A 2x3 grid of temperatures, a 4x4 depth image and the ids of what was seen.
    let temperature = Tensor::from_slice(&[20.0 + s, 20.5, 21.0, 21.5, 22.0, 22.5], &[2, 3])?;
    let depth: Vec<u16> = (0..16).map(|i| i * 100 + step as u16).collect();
    let ids = Tensor::from_slice(&[i64::from(step), -1, 42], &[3])?;
    Ok(Message::new()
        .field("step", step)
        .field("site", "north")
        .tensor("temperature", temperature)
        .tensor("depth", Tensor::from_slice(&depth, &[4, 4])?)
        .tensor("ids", ids))
}

/// Checks that `message` is what [`reading`] made for `step`.
fn check(step: u32, message: &Message) -> Result<(), Box<dyn Error>> {
    let sent = reading(step)?;
    if message.fields() != sent.fields() {
        return Err(format!("step {step}: fields {:?}", message.fields()).into());
    }
    for (name, want) in sent.tensors() {
        let got = message
            .get(name)
            .ok_or_else(|| format!("step {step}: no tensor `{name}`"))?;
        // Same dtype, same shape, same bytes.
        if got.dtype() != want.dtype()
            || got.shape() != want.shape()
            || got.contiguous_bytes()? != want.contiguous_bytes()?
        {
            return Err(format!("step {step}: tensor `{name}` differs: {got:?}").into());
        }
    }
    Ok(())
}
