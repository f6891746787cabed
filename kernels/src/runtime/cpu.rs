//! The host: processor model, cores and memory.

use serde::Serialize;

/// Facts about the host processor and memory.
#[derive(Debug, Clone, Serialize)]
pub struct CpuInfo {
    /// The processor model, or `unknown`.
    pub model: String,
    /// Hardware threads this process may use.
    pub cores: usize,
    /// Total memory in bytes, when the platform says.
    pub memory_bytes: Option<u64>,
}

impl CpuInfo {
    /// Reads the host's facts; fields it cannot read are `unknown` or `None`.
    pub fn probe() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| {
                let (key, value) = l.split_once(':')?;
                matches!(key.trim(), "model name" | "Model" | "Hardware")
                    .then(|| value.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_bytes = meminfo.lines().find_map(|l| {
            let rest = l.strip_prefix("MemTotal:")?;
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            kib.checked_mul(1024)
        });
        Self {
            model,
            cores,
            memory_bytes,
        }
    }
}
