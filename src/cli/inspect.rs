//! `tensorferry inspect`: print every frame of a record file and check it.

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::{json, Value};
use tensorferry::engine::file::FileReader;
use tensorferry::engine::wire::Frame;

use super::{human_bytes, print_json, Outcome, EXIT_INVALID};

/// Options of `tensorferry inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A record file (`.tfm`), as `send --to file://PATH` writes it.
    file: PathBuf,

    /// Print one JSON object: {"valid", "frames": [...], "error"}.
    #[arg(long)]
    json: bool,
}

fn frame_json(offset: u64, f: &Frame, checksum_error: &Option<String>) -> Value {
    let tensors: Vec<Value> = f
        .tensors
        .iter()
        .zip(f.message.tensors())
        .map(|(t, (name, tensor))| {
            json!({"name": name, "dtype": t.dtype, "shape": tensor.shape(),
                   "device": t.device, "bytes": t.bytes, "checksum": t.checksum.map(|c| c.to_string())})
        })
        .collect();
    let objects: Vec<Value> = f
        .message
        .objects()
        .map(|(n, o)| json!({"name": n, "tag": o.tag, "buffers": o.buffers.len()}))
        .collect();
    json!({"offset": offset, "frame_len": f.frame_len, "channel": f.meta.channel, "seq": f.meta.seq,
           "kind": f.meta.kind, "id": f.meta.id, "fields": f.message.fields(), "tensors": tensors,
           "objects": objects, "checksum_error": checksum_error})
}

pub fn run(args: &Args) -> Outcome {
    let reader = FileReader::open(&args.file).map_err(|e| e.to_string())?;
    let mut frames = Vec::new();
    let mut error = None;
    let mut offset = 0;
    for (index, frame) in reader.enumerate() {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                error = Some(format!("frame {index}: {e}"));
                break;
            }
        };
        let checksum_error = frame.verify_checksums().err().map(|e| e.to_string());
        if !args.json {
            say!(
                "frame {index} at byte {offset} ({}): {} #{} {:?}",
                human_bytes(frame.frame_len),
                frame.meta.channel,
                frame.meta.seq,
                frame.meta.kind
            );
            if !frame.message.fields().is_empty() {
                say!("  fields {}", Value::Object(frame.message.fields().clone()));
            }
            for (t, (name, tensor)) in frame.tensors.iter().zip(frame.message.tensors()) {
                let check = match (&t.checksum, &checksum_error) {
                    (None, _) => "no checksum".to_string(),
                    (Some(c), Some(e)) if e.contains(&format!("`{name}`")) => {
                        format!("checksum {c} MISMATCH")
                    }
                    (Some(c), _) => format!("checksum {c} ok"),
                };
                say!(
                    "  {:<16} {:<6} {:?} from {}, {} bytes, {check}",
                    name,
                    t.dtype,
                    tensor.shape(),
                    t.device,
                    t.bytes
                );
            }
            for (n, o) in frame.message.objects() {
                say!(
                    "  {n:<16} object `{}`, {} buffer(s)",
                    o.tag,
                    o.buffers.len()
                );
            }
        }
        if let Some(e) = &checksum_error {
            error.get_or_insert_with(|| format!("frame {index}: {e}"));
        }
        frames.push(frame_json(offset, &frame, &checksum_error));
        offset += frame.frame_len;
    }
    let valid = error.is_none();
    if args.json {
        print_json(&json!({"valid": valid, "frames": frames, "error": error}));
    } else {
        say!("{} frame(s), {}", frames.len(), human_bytes(offset));
        if let Some(e) = &error {
            eprintln!("error: {e}");
        }
    }
    Ok(if valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVALID)
    })
}
