//! The `tensorferry` command-line tool.

mod cli;

use std::process::ExitCode;

/// The tool's allocator. A message is often built on one thread and freed
/// on another (a publisher's, an I/O thread's, a subscriber's); the system
/// allocator then takes its slow path and an arena lock for most of them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // First, while this is the only thread: GPU drivers read the variable.
    let _runtime_dir = cli::runtime_dir::ensure();
    cli::run()
}
