//! Proxies instead of tensors: a producer puts each large tensor into a
//! store once and publishes a small proxy of it; consumers resolve the
//! proxy of the next step in the background while they work on the current
//! one, so the fetch overlaps their computation.
//!
//! Here the store is served by the producer's node over tcp, as it would be
//! for consumers on other hosts; the consumers reach it through their own
//! node. Each step's proxy is a JSON field of an ordinary message.
//!
//! ```sh
//! cargo run --release --example proxies
//! ```

use std::error::Error;
use std::time::Duration;

use tensorferry::store::{Proxy, Store, DEFAULT_CHANNEL};
use tensorferry::{Message, Node, Tensor};

const STEPS: u64 = 4;
/// Elements per layer: 4 MiB of f32.
const ELEMENTS: usize = 1 << 20;
const WAIT: Duration = Duration::from_secs(20);

/// A stand-in for a consumer's computation on one step's weights: their sum.
fn work_on(weights: &Tensor) -> Result<f64, Box<dyn Error>> {
    Ok(weights
        .as_slice::<f32>()?
        .iter()
        .map(|&v| f64::from(v))
        .sum())
}

/// Runs the producer and one consumer, checking every step's sum.
pub fn main() -> Result<(), Box<dyn Error>> {
    // The producer: a node that listens, serves a store, and publishes.
    let producer = Node::builder()
        .name("producer")
        .listen("tcp://127.0.0.1:0")
        .build()?;
    let addr = producer.listen_addrs()[0].to_string();
    let dir = std::env::temp_dir().join(format!("tensorferry-proxies-{}", std::process::id()));
    // Proxies name the node serving the store, so they resolve anywhere
    // that node can be reached.
    let store = Store::dir(&dir)?.served_at(&addr, DEFAULT_CHANNEL);
    store.serve(&producer, DEFAULT_CHANNEL)?;
    let publisher = producer.publisher("/weights");

    // A consumer: subscribes to the proxies and resolves them ahead of use.
    let consumer = Node::builder().name("consumer").build()?;
    let subscription = consumer.subscribe(&addr, "/weights")?;
    publisher.wait_for_subscribers(1, WAIT)?;

    for step in 0..STEPS {
        let values: Vec<f32> = (0..ELEMENTS)
            .map(|i| (i % 7) as f32 + step as f32)
            .collect();
        let weights = Tensor::from_slice(&values, &[ELEMENTS])?;
        let proxy = store.put_proxy(
            &Message::new()
                .field("step", step)
                .tensor("weights", weights),
        )?;
        publisher.send(
            Message::new()
                .field("step", step)
                .field("weights", proxy.to_json()),
        )?;
    }

    // Resolve step n+1 in the background while working on step n.
    let next_proxy = |received: Message| -> Result<Proxy, Box<dyn Error>> {
        let field = received
            .get_field("weights")
            .ok_or("a message without `weights`")?;
        let proxy = Proxy::from_json(field)?;
        proxy.set_node(&consumer);
        proxy.resolve_async();
        Ok(proxy)
    };
    let mut ahead = next_proxy(subscription.recv_timeout(WAIT)?.message)?;
    for step in 0..STEPS {
        let current = ahead.clone();
        if step + 1 < STEPS {
            ahead = next_proxy(subscription.recv_timeout(WAIT)?.message)?;
        }
        let message = current.resolve()?;
        let weights = message.get("weights").ok_or("no `weights` tensor")?;
        let sum = work_on(weights)?;
        println!(
            "step {step}: {} MiB fetched by proxy `{}`, sum {sum}",
            weights.size_bytes() >> 20,
            current.key()
        );
        let want: f64 = (0..ELEMENTS).map(|i| (i % 7) as f64 + step as f64).sum();
        if sum != want {
            return Err(format!("step {step}: sum {sum}, expected {want}").into());
        }
    }
    producer.shutdown();
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
