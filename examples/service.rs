//! A request/reply service with declared input and output schemas.
//!
//! A `segmenter` node serves `/threshold`: given an RGB image (`u8`, shape
//! `H×W×3`) and a `threshold` field, it replies with a mask (`u8`, `H×W`)
//! of the pixels brighter than the threshold and how many there are. Then a
//! client sends three requests:
//!
//! 1. a good one, answered;
//! 2. an image with four channels: the input schema refuses it before the
//!    handler runs (error code `bad_request`);
//! 3. a threshold out of range: the handler returns an error, which travels
//!    back as an error reply with the handler's own code.
//!
//! ```sh
//! cargo run --example service
//! ```

use std::error::Error;
use std::time::Duration;

use tensorferry::{DType, Handler, Message, Node, Schema, Service, ServiceError, Tensor};

/// How long a request may wait for its reply.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The service's state. A handler runs one request at a time, so it can
/// keep state without locking.
struct Threshold {
    served: u64,
}

impl Handler for Threshold {
    // `init` runs when the service is registered: load a model, open a
    // device, … An error here makes `Node::serve` fail.
    fn init(&mut self) -> Result<(), ServiceError> {
        println!("threshold service starting");
        Ok(())
    }

    fn exec(&mut self, request: Message) -> Result<Message, ServiceError> {
        // The input schema has checked that `image` is a u8 H×W×3 tensor and
        // that `threshold` is present; what it cannot know, the handler checks.
        let threshold = request
            .get_field("threshold")
            .and_then(serde_json::Value::as_u64)
            .filter(|t| *t <= 255)
            .ok_or_else(|| {
                ServiceError::new(
                    "bad_threshold",
                    "`threshold` must be an integer from 0 to 255",
                )
            })?;
        let image = request
            .get("image")
            .expect("the input schema requires `image`");
        let (h, w) = (image.shape()[0], image.shape()[1]);
        let pixels = image
            .to_contiguous()
            .and_then(|t| t.contiguous_bytes().map(<[u8]>::to_vec))
            .map_err(|e| ServiceError::new("internal", e.to_string()))?;
        let mask: Vec<u8> = pixels
            .chunks_exact(3)
            .map(|rgb| {
                let brightness = rgb.iter().map(|&c| u64::from(c)).sum::<u64>() / 3;
                u8::from(brightness > threshold)
            })
            .collect();
        let count = mask.iter().filter(|&&m| m == 1).count();
        let mask = Tensor::from_slice(&mask, &[h, w])
            .map_err(|e| ServiceError::new("internal", e.to_string()))?;
        self.served += 1;
        Ok(Message::new().field("count", count).tensor("mask", mask))
    }

    // `fini` runs when the node shuts down.
    fn fini(&mut self) {
        println!(
            "threshold service stopping after {} request(s)",
            self.served
        );
    }
}

/// Serves `/threshold` and sends it a good request, one the schema refuses and one the handler refuses.
pub fn main() -> Result<(), Box<dyn Error>> {
    let server = Node::builder()
        .name("segmenter")
        .listen("tcp://127.0.0.1:0")
        .build()?;
    let addr = server.listen_addrs()[0].to_string();

    // What a request must hold (checked before the handler sees it) and what
    // a reply must hold (a reply that does not match becomes a `bad_reply`
    // error, so a client never gets a reply of the wrong form).
    let input = Schema::new()
        .tensor("image", DType::U8, "*,*,3")?
        .field("threshold");
    let output = Schema::new()
        .tensor("mask", DType::U8, "*,*")?
        .field("count");
    let service = Service::new(Threshold { served: 0 })
        .input(input)
        .output(output);
    server.serve("/threshold", service)?;
    println!("serving /threshold at {addr}");

    let client = Node::builder().name("client").build()?;

    // 1. A 2×2 image: two bright pixels, two dark ones.
    let image = Tensor::from_slice(
        &[250u8, 250, 250, 10, 10, 10, 10, 20, 30, 200, 220, 240],
        &[2, 2, 3],
    )?;
    let request = Message::new()
        .field("threshold", 128)
        .tensor("image", image);
    let reply = client.request(&addr, "/threshold", request, TIMEOUT)?;
    let mask = reply.get("mask").ok_or("the reply has no mask")?;
    println!(
        "answered: count {}, mask {:?} = {:?}",
        reply.get_field("count").ok_or("the reply has no count")?,
        mask.shape(),
        mask.contiguous_bytes()?
    );
    if mask.contiguous_bytes()? != [1, 0, 0, 1] {
        return Err("the mask is wrong".into());
    }

    // 2. Four channels: the schema answers, and the handler never runs.
    let rgba = Tensor::zeros(DType::U8, &[2, 2, 4])?;
    let request = Message::new().field("threshold", 128).tensor("image", rgba);
    let refused = client.request(&addr, "/threshold", request, TIMEOUT);
    expect_error_code(refused, "bad_request")?;

    // 3. A threshold the handler refuses: its error becomes the reply.
    let image = Tensor::zeros(DType::U8, &[2, 2, 3])?;
    let request = Message::new()
        .field("threshold", 1000)
        .tensor("image", image);
    let refused = client.request(&addr, "/threshold", request, TIMEOUT);
    expect_error_code(refused, "bad_threshold")?;

    // Shutting down runs the service's `fini`.
    server.shutdown();
    Ok(())
}

/// Prints an error reply's code and message; an error unless `result` is an
/// error reply with code `want`.
fn expect_error_code(
    result: tensorferry::Result<Message>,
    want: &str,
) -> Result<(), Box<dyn Error>> {
    match result {
        // An error reply: the code is for programs, the message for people.
        Err(tensorferry::Error::Remote { code, message, .. }) => {
            println!("refused: error `{code}`: {message}");
            if code == want {
                Ok(())
            } else {
                Err(format!("expected error `{want}`, got `{code}`").into())
            }
        }
        Err(other) => Err(other.into()),
        Ok(reply) => Err(format!("expected error `{want}`, got a reply: {reply:?}").into()),
    }
}
