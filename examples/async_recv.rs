//! Receiving, sending and requesting from async code, under tokio.
//!
//! The calls that wait on traffic have async forms that work on any
//! executor (tensorferry itself does not depend on tokio):
//! `Subscription::recv_async`, `Publisher::send_async`,
//! `Publisher::wait_for_subscribers_async` and `Node::request_async`. None
//! of them takes a time limit: wrap them in your executor's timeout, here
//! `tokio::time::timeout`. Connecting (`Node::subscribe`, `Node::connect`)
//! has no async form, so it goes to tokio's blocking threads. A task
//! receives while another sends, then a request goes to a service.
//!
//! ```sh
//! cargo run --example async_recv
//! ```

use std::error::Error;
use std::time::Duration;

use tensorferry::{Message, Node, Service, ServiceError, Tensor};
use tokio::time::timeout;

/// Any error, from any task.
type BoxError = Box<dyn Error + Send + Sync>;

/// Messages the sending task sends.
const COUNT: u64 = 5;
/// How long any one step may wait before the example gives up.
const WAIT: Duration = Duration::from_secs(10);

/// Receives, sends and requests from tasks of a tokio runtime.
#[tokio::main]
pub async fn main() -> Result<(), BoxError> {
    let server = Node::builder()
        .name("ticker")
        .listen("tcp://127.0.0.1:0")
        .build()?;
    let addr = server.listen_addrs()[0].to_string();
    let client = Node::builder().name("listener").build()?;

    // Subscribing connects, which blocks (with retries, up to the node's
    // connect timeout): keep it off the executor's threads.
    let subscription = {
        let (client, addr) = (client.clone(), addr.clone());
        tokio::task::spawn_blocking(move || client.subscribe(&addr, "/ticks")).await??
    };

    // The receiving task: `recv_async` waits without holding a thread.
    let receiving = tokio::spawn(async move {
        let mut sum = 0u64;
        for _ in 0..COUNT {
            let got = timeout(WAIT, subscription.recv_async()).await??;
            let n = got
                .message
                .get_field("n")
                .and_then(serde_json::Value::as_u64)
                .ok_or("a tick without `n`")?;
            println!("received tick {n} (seq {})", got.seq);
            sum += n;
        }
        Ok::<u64, BoxError>(sum)
    });

    // The sending task: waits for the subscriber, then sends; `send_async`
    // waits (without blocking) while a subscriber's queue is full.
    let publisher = server.publisher("/ticks");
    let sending = tokio::spawn(async move {
        timeout(WAIT, publisher.wait_for_subscribers_async(1)).await??;
        for n in 0..COUNT {
            let tick = Message::new()
                .field("n", n)
                .tensor("t", Tensor::from_slice(&[n as f32; 4], &[4])?);
            publisher.send_async(tick).await?;
        }
        Ok::<(), BoxError>(())
    });

    sending.await??;
    let sum = receiving.await??;
    if sum != (0..COUNT).sum::<u64>() {
        return Err(format!("the ticks add up to {sum}").into());
    }

    // A channel nobody publishes on: the timeout ends the wait.
    let quiet = client.subscriber("/quiet");
    match timeout(Duration::from_millis(100), quiet.recv_async()).await {
        Err(_elapsed) => println!("nothing on /quiet within 100 ms"),
        Ok(got) => return Err(format!("/quiet was not quiet: {got:?}").into()),
    }

    // A request from async code. The connection exists already; were it
    // new, `request_async` would connect before returning its future.
    let echo =
        |request: Message| -> Result<Message, ServiceError> { Ok(request.field("echoed", true)) };
    server.serve("/echo", Service::new(echo))?;
    let request = client.request_async(&addr, "/echo", Message::new().field("hello", "world"))?;
    let reply = timeout(WAIT, request).await??;
    println!(
        "reply: {}",
        serde_json::Value::Object(reply.fields().clone())
    );
    if reply.get_field("echoed") != Some(&serde_json::json!(true)) {
        return Err("the reply was not echoed".into());
    }
    Ok(())
}
