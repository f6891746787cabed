//! The `tensorferry` command-line tool.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    // First, while this is the only thread: GPU drivers read the variable.
    let _runtime_dir = cli::runtime_dir::ensure();
    cli::run()
}
