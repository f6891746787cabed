//! A private `XDG_RUNTIME_DIR` for a process started without a usable one.
//!
//! Mesa's Vulkan and Wayland code looks for `XDG_RUNTIME_DIR` whenever wgpu
//! probes its adapters, and without one prints `error: XDG_RUNTIME_DIR is
//! invalid or not set in the environment.` — a line that reads as ours on a
//! server, in a container or under `sudo`. [`ensure`] gives the process a
//! fresh 0700 directory under the system temp dir instead, before any thread
//! starts, and the [`Guard`] it returns removes it at exit. Processes this
//! one starts (the receiving sides of `bench`) inherit it.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const VAR: &str = "XDG_RUNTIME_DIR";
/// Directories made here are named `PREFIX` + the process id (+ `-N` on a clash).
const PREFIX: &str = "tensorferry-runtime-";

/// The directory this process made, if it made one.
static CREATED: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Removes the directory [`ensure`] made (if any) when dropped.
#[must_use = "the directory is removed when the guard drops"]
pub struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        remove();
    }
}

/// Sets `XDG_RUNTIME_DIR` to a new private directory unless it already
/// names a usable one. Call first thing in `main`: changing the environment
/// is sound only while no other thread can read it.
pub fn ensure() -> Guard {
    let usable_now = std::env::var_os(VAR).is_some_and(|d| usable(Path::new(&d)));
    if !usable_now {
        sweep_stale(&std::env::temp_dir());
        // Without a directory the driver's line comes back, nothing worse:
        // not a reason to stop the command.
        if let Ok(dir) = create(&std::env::temp_dir()) {
            // Sound: called before any thread is spawned (see above).
            std::env::set_var(VAR, &dir);
            *CREATED.lock().unwrap_or_else(|p| p.into_inner()) = Some(dir);
        }
    }
    Guard(())
}

/// Removes the directory [`ensure`] made, now; for paths that leave with
/// `std::process::exit`, which runs no destructors.
pub fn remove() {
    let dir = CREATED.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(dir) = dir {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// What the XDG base directory spec asks of the directory: an absolute
/// path to a directory of this user that only this user can enter.
fn usable(dir: &Path) -> bool {
    if !dir.is_absolute() {
        return false;
    }
    std::fs::metadata(dir).is_ok_and(|m| {
        m.is_dir() && m.uid() == current_uid() && m.permissions().mode() & 0o777 == 0o700
    })
}

/// This process's effective uid: the owner of `/proc/self` (std has no
/// call for it, and this needs no `unsafe`).
fn current_uid() -> u32 {
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
}

/// Makes `PREFIX<pid>` (or `PREFIX<pid>-N`) in `parent`, mode 0700.
fn create(parent: &Path) -> std::io::Result<PathBuf> {
    let pid = std::process::id();
    let mut last = None;
    for n in 0..16 {
        let name = if n == 0 {
            format!("{PREFIX}{pid}")
        } else {
            format!("{PREFIX}{pid}-{n}")
        };
        let dir = parent.join(name);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                // The umask may have taken bits away; the spec wants exactly 0700.
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free name")))
}

/// Removes the empty directories of processes that ended without removing
/// theirs (killed by a signal), so runs leave nothing behind.
fn sweep_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let uid = current_uid();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let ours = entry.metadata().is_ok_and(|m| m.is_dir() && m.uid() == uid);
        if ours && !Path::new(&format!("/proc/{pid}")).exists() {
            // Only an empty one: remove_dir refuses anything else.
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tensorferry-runtime-test-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn makes_a_private_directory_and_a_second_name_on_a_clash() {
        let parent = scratch("create");
        let first = create(&parent).expect("first");
        let second = create(&parent).expect("second");
        assert_ne!(first, second);
        for dir in [&first, &second] {
            let mode = std::fs::metadata(dir).expect("made").permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", dir.display());
            assert!(usable(dir));
        }
        std::fs::remove_dir_all(parent).expect("clean up");
    }

    #[test]
    fn refuses_relative_missing_and_open_directories() {
        let parent = scratch("usable");
        assert!(!usable(Path::new("relative/dir")));
        assert!(!usable(&parent.join("missing")));
        let open = parent.join("open");
        std::fs::create_dir(&open).expect("dir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert!(!usable(&open));
        std::fs::remove_dir_all(parent).expect("clean up");
    }

    #[test]
    fn sweeps_empty_directories_of_ended_processes_only() {
        let parent = scratch("sweep");
        // No process has pid u32::MAX - 1 (pid_max is at most 2^22).
        let ended = parent.join(format!("{PREFIX}{}", u32::MAX - 1));
        let ended_full = parent.join(format!("{PREFIX}{}-1", u32::MAX - 1));
        let alive = parent.join(format!("{PREFIX}{}", std::process::id()));
        for d in [&ended, &ended_full, &alive] {
            std::fs::create_dir(d).expect("dir");
        }
        std::fs::write(ended_full.join("socket"), b"").expect("file");
        sweep_stale(&parent);
        assert!(!ended.exists(), "an empty one of an ended process goes");
        assert!(ended_full.exists(), "one that holds something stays");
        assert!(alive.exists(), "a live process keeps its own");
        std::fs::remove_dir_all(parent).expect("clean up");
    }
}
