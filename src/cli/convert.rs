//! `tensorferry convert`: record files to safetensors and back.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tensorferry::engine::file::{FileReader, FileWriter};
use tensorferry::engine::safetensors::{export, import};
use tensorferry::engine::wire::{encode, EncodeOptions};

use super::Outcome;

/// Options of `tensorferry convert`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The input: a record file (`.tfm`) or a `.safetensors` file.
    input: PathBuf,

    /// The output: `.safetensors` for a `.tfm` input, `.tfm` for a `.safetensors` input.
    output: PathBuf,

    /// Channel for the frame made from a safetensors file that tensorferry did not write.
    #[arg(long, default_value = "/safetensors")]
    channel: String,
}

fn kind(path: &Path) -> Option<&'static str> {
    match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "tfm" => Some("tfm"),
        "safetensors" => Some("safetensors"),
        _ => None,
    }
}

pub fn run(args: &Args) -> Outcome {
    match (kind(&args.input), kind(&args.output)) {
        (Some("tfm"), Some("safetensors")) => {
            let frames = FileReader::open(&args.input)
                .and_then(|r| r.collect::<Result<Vec<_>, _>>())
                .map_err(|e| e.to_string())?;
            let n = export(&frames, &args.output).map_err(|e| e.to_string())?;
            say!(
                "wrote {n} tensor(s) from {} frame(s) to {}",
                frames.len(),
                args.output.display()
            );
        }
        (Some("safetensors"), Some("tfm")) => {
            let frames = import(&args.input, &args.channel).map_err(|e| e.to_string())?;
            let mut w = FileWriter::create(&args.output).map_err(|e| e.to_string())?;
            for f in &frames {
                let enc = encode(&f.message, &f.meta, EncodeOptions::default())
                    .map_err(|e| e.to_string())?;
                w.write(&enc).map_err(|e| e.to_string())?;
            }
            w.sync().map_err(|e| e.to_string())?;
            say!(
                "wrote {} frame(s) to {}",
                frames.len(),
                args.output.display()
            );
        }
        _ => {
            return Err(format!(
                "convert `{}` to `{}`: give a .tfm and a .safetensors file, in either order",
                args.input.display(),
                args.output.display()
            ))
        }
    }
    Ok(ExitCode::SUCCESS)
}
