//! A value of your own type in a message, through a `Codec`.
//!
//! A detector sends the objects it found in a frame — each a label, a score
//! and a bounding box — beside the frame itself. `DetectionsCodec` turns a
//! `Vec<Detection>` into JSON (labels and scores) plus one byte buffer (the
//! boxes as little-endian `f32`s), and back. The message crosses TCP; the
//! receiver decodes the value with a `CodecRegistry` that trusts this codec.
//! A registry without it refuses the object, naming its tag: nothing in a
//! message can make a receiver run code it did not register.
//!
//! ```sh
//! cargo run --example custom_codec
//! ```

use std::error::Error;
use std::time::Duration;

use serde_json::{json, Value};
use tensorferry::{Codec, CodecRegistry, DType, HostBuffer, Message, Node, Tensor};

const WAIT: Duration = Duration::from_secs(10);

/// One object a detector found.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// What it is.
    pub label: String,
    /// How sure the detector is, 0 to 1.
    pub score: f32,
    /// Where it is: x, y, width, height in pixels.
    pub bbox: [f32; 4],
}

/// Carries a `Vec<Detection>`.
struct DetectionsCodec;

impl DetectionsCodec {
    /// The error for input this codec does not write.
    fn bad(&self, what: impl Into<String>) -> tensorferry::Error {
        tensorferry::Error::Codec {
            tag: self.tag().to_string(),
            what: what.into(),
        }
    }
}

impl Codec for DetectionsCodec {
    type Value = Vec<Detection>;

    // The tag names the codec and its version: a receiver decodes only tags
    // it registered, so a changed layout gets a new tag (`…/2`).
    fn tag(&self) -> &str {
        "example.detections/1"
    }

    fn encode(&self, detections: &Vec<Detection>) -> tensorferry::Result<(Value, Vec<HostBuffer>)> {
        let labels: Vec<&str> = detections.iter().map(|d| d.label.as_str()).collect();
        let scores: Vec<f32> = detections.iter().map(|d| d.score).collect();
        // Bulk numbers go in a buffer, which travels beside the JSON without
        // being turned into text.
        let boxes: Vec<u8> = detections
            .iter()
            .flat_map(|d| d.bbox)
            .flat_map(f32::to_le_bytes)
            .collect();
        Ok((
            json!({"labels": labels, "scores": scores}),
            vec![HostBuffer::copy_from(&boxes)],
        ))
    }

    // The input may come from anyone: check everything, panic on nothing.
    fn decode(&self, value: &Value, buffers: &[HostBuffer]) -> tensorferry::Result<Vec<Detection>> {
        let labels = value["labels"]
            .as_array()
            .ok_or_else(|| self.bad("`labels` is not an array"))?;
        let scores = value["scores"]
            .as_array()
            .ok_or_else(|| self.bad("`scores` is not an array"))?;
        let [boxes] = buffers else {
            return Err(self.bad(format!("want one buffer of boxes, got {}", buffers.len())));
        };
        if scores.len() != labels.len() || boxes.len() != labels.len() * 16 {
            return Err(self.bad(format!(
                "{} labels, {} scores and {} bytes of boxes do not agree",
                labels.len(),
                scores.len(),
                boxes.len()
            )));
        }
        let coordinates: Vec<f32> = boxes
            .as_slice()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        labels
            .iter()
            .zip(scores)
            .zip(coordinates.chunks_exact(4))
            .map(|((label, score), bbox)| {
                Ok(Detection {
                    label: label
                        .as_str()
                        .ok_or_else(|| self.bad("a label is not a string"))?
                        .to_string(),
                    score: score
                        .as_f64()
                        .ok_or_else(|| self.bad("a score is not a number"))?
                        as f32,
                    bbox: [bbox[0], bbox[1], bbox[2], bbox[3]],
                })
            })
            .collect()
    }
}

/// Sends detections in a message over TCP and decodes them on the other side.
pub fn main() -> Result<(), Box<dyn Error>> {
    let detector = Node::builder()
        .name("detector")
        .listen("tcp://127.0.0.1:0")
        .build()?;
    let addr = detector.listen_addrs()[0].to_string();
    let tracker = Node::builder().name("tracker").build()?;
    let results = tracker.subscribe(&addr, "/detections")?;
    let publisher = detector.publisher("/detections");
    publisher.wait_for_subscribers(1, WAIT)?;

    // The sender: fields, a tensor and the detections in one message.
    let found = vec![
        Detection {
            label: "cat".into(),
            score: 0.97,
            bbox: [12.0, 40.0, 64.0, 48.0],
        },
        Detection {
            label: "mug".into(),
            score: 0.61,
            bbox: [150.5, 20.0, 18.0, 22.0],
        },
    ];
    let message = Message::new()
        .field("frame", 7)
        .tensor("thumbnail", Tensor::zeros(DType::U8, &[32, 32, 3])?)
        .object("detections", &DetectionsCodec, &found)?;
    publisher.send(message)?;

    // The receiver: decoding needs a registry that trusts the codec's tag.
    let got = results.recv_timeout(WAIT)?;
    let mut registry = CodecRegistry::new();
    registry.register(DetectionsCodec)?;
    let detections: Vec<Detection> = registry.decode(&got.message, "detections")?;
    for d in &detections {
        println!(
            "frame {}: {} ({:.2}) at {:?}",
            got.message.get_field("frame").unwrap_or(&Value::Null),
            d.label,
            d.score,
            d.bbox
        );
    }
    if detections != found {
        return Err("the detections changed on the way".into());
    }

    // A registry without the codec refuses the object and names its tag.
    match CodecRegistry::new().decode::<Vec<Detection>>(&got.message, "detections") {
        Err(e) => println!("without the codec: {e}"),
        Ok(_) => return Err("an unregistered tag was decoded".into()),
    }
    Ok(())
}
