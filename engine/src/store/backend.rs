//! The backends: frames in memory, frames in files of a directory, and a
//! backend that names another location for the proxies it makes.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use super::served::RemoteBackend;
use super::{Entry, Location, Manifest, Overwrite};
use crate::buffer::{HostBuffer, HostBufferMut};
use crate::error::{Error, Result};
use crate::message::Message;
use crate::node::lock;
use crate::outbound::write_frame;
use crate::wire::{self, EncodeOptions, Encoded, FrameMeta, Limits};

/// What every store does; each call is one whole operation (a served
/// store's is one request).
pub(crate) trait Backend: Send + Sync + 'static {
    fn location(&self) -> Location;
    fn put(&self, key: &str, message: &Message, overwrite: Overwrite) -> Result<Manifest>;
    fn get(&self, key: &str) -> Result<(Message, Manifest)>;
    fn manifest(&self, key: &str) -> Result<Manifest>;
    fn exists(&self, key: &str) -> Result<bool>;
    fn evict(&self, key: &str) -> Result<bool>;
    fn list(&self) -> Result<Vec<Entry>>;
    /// The served-store client behind this backend, if it is one.
    fn remote(&self) -> Option<&RemoteBackend> {
        None
    }
}

/// The channel named in stored frames (a store's frames never travel as
/// messages of a channel; this names them in `tensorferry inspect`).
fn stored_meta(key: &str) -> FrameMeta {
    FrameMeta::message(format!("/tensorferry/store/{key}"), 0)
}

/// `message` as a stored frame: every tensor with its checksum, so a proxy
/// can say what the bytes must be.
fn encode_stored(key: &str, message: &Message) -> Result<Encoded> {
    message.check_names()?;
    wire::encode(
        message,
        &stored_meta(key),
        EncodeOptions {
            checksums: true,
            compact: true,
        },
    )
}

/// Decodes a stored frame, checking it as if it came from the network.
fn decode_stored(key: &str, store: &Location, region: &HostBuffer) -> Result<(Message, Manifest)> {
    let frame = wire::decode(region, &Limits::default()).map_err(|e| {
        Error::Invalid(format!(
            "store {store}: the entry `{key}` is damaged ({e}); evict it and put it again"
        ))
    })?;
    let manifest = Manifest::from_frame(key, &frame.message, &frame.tensors, frame.frame_len)?;
    Ok((frame.message, manifest))
}

fn not_stored(store: &Location, key: &str) -> Error {
    Error::NotStored {
        store: store.to_string(),
        key: key.to_string(),
    }
}

fn already_stored(store: &Location, key: &str) -> Error {
    Error::AlreadyStored {
        store: store.to_string(),
        key: key.to_string(),
    }
}

/// Memory stores of this process, by name, for proxies to find.
fn registry() -> &'static Mutex<HashMap<String, Weak<MemoryBackend>>> {
    static STORES: OnceLock<Mutex<HashMap<String, Weak<MemoryBackend>>>> = OnceLock::new();
    STORES.get_or_init(Mutex::default)
}

/// Frames in this process's memory.
pub(crate) struct MemoryBackend {
    name: String,
    frames: Mutex<HashMap<String, HostBuffer>>,
}

impl MemoryBackend {
    /// The store called `name` (a fresh name when `None`), created when absent.
    pub(crate) fn create(name: Option<&str>) -> Arc<MemoryBackend> {
        let name = name.map_or_else(
            || format!("{}-{}", std::process::id(), super::new_key()),
            str::to_string,
        );
        let mut stores = lock(registry());
        if let Some(live) = stores.get(&name).and_then(Weak::upgrade) {
            return live;
        }
        let store = Arc::new(MemoryBackend {
            name: name.clone(),
            frames: Mutex::default(),
        });
        stores.retain(|_, s| s.strong_count() > 0);
        stores.insert(name, Arc::downgrade(&store));
        store
    }

    /// The live store called `name`.
    pub(crate) fn find(name: &str) -> Result<Arc<MemoryBackend>> {
        lock(registry()).get(name).and_then(Weak::upgrade).ok_or_else(|| {
            Error::Invalid(format!(
                "memory store `{name}` is not in this process: a memory store lives in the process that made it, \
                 while a handle to it does; serve it (Store::serve) or use a directory store to reach it from elsewhere"
            ))
        })
    }
}

impl Backend for MemoryBackend {
    fn location(&self) -> Location {
        Location::Memory {
            name: self.name.clone(),
        }
    }

    fn put(&self, key: &str, message: &Message, overwrite: Overwrite) -> Result<Manifest> {
        if overwrite == Overwrite::Refuse && lock(&self.frames).contains_key(key) {
            return Err(already_stored(&self.location(), key));
        }
        let frame = encode_stored(key, message)?;
        let len = usize::try_from(frame.frame_len()).map_err(|_| {
            Error::Invalid("a message larger than this machine's address space".into())
        })?;
        let mut bytes = HostBufferMut::zeroed(len);
        let mut out: &mut [u8] = bytes.as_mut_slice();
        write_frame(&frame, &mut out)
            .map_err(|e| Error::io("cannot copy a message into a memory store", e))?;
        let region = bytes.freeze();
        let (_, manifest) = decode_stored(key, &self.location(), &region)?;
        let mut frames = lock(&self.frames);
        if overwrite == Overwrite::Refuse && frames.contains_key(key) {
            return Err(already_stored(&self.location(), key));
        }
        frames.insert(key.to_string(), region);
        Ok(manifest)
    }

    fn get(&self, key: &str) -> Result<(Message, Manifest)> {
        let region = lock(&self.frames)
            .get(key)
            .cloned()
            .ok_or_else(|| not_stored(&self.location(), key))?;
        decode_stored(key, &self.location(), &region)
    }

    fn manifest(&self, key: &str) -> Result<Manifest> {
        Ok(self.get(key)?.1)
    }

    fn exists(&self, key: &str) -> Result<bool> {
        Ok(lock(&self.frames).contains_key(key))
    }

    fn evict(&self, key: &str) -> Result<bool> {
        Ok(lock(&self.frames).remove(key).is_some())
    }

    fn list(&self) -> Result<Vec<Entry>> {
        Ok(lock(&self.frames)
            .iter()
            .map(|(k, f)| Entry {
                key: k.clone(),
                bytes: f.len() as u64,
            })
            .collect())
    }
}

/// The file extension of a directory store's entries.
const EXTENSION: &str = "tfm";

/// One file per key in a directory; files are written whole under a
/// temporary name and then linked into place, so a reader never sees half
/// an entry, and read back by mapping them.
pub(crate) struct DirBackend {
    dir: PathBuf,
    /// The last few files mapped by gets, by key, with the identity of the
    /// file they map: a get of an unchanged entry reuses the mapping (and
    /// the pages already faulted into it) instead of mapping it anew. An
    /// entry whose file was removed or replaced meanwhile (by any process)
    /// is let go when another entry is next mapped, so at most a few
    /// removed files' space is held.
    maps: Mutex<Vec<(String, FileId, HostBuffer)>>,
}

/// What tells one file from another that replaced it under the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
}

impl FileId {
    fn of(meta: &fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
        }
    }
}

/// Most mappings a directory store keeps for reuse.
const KEPT_MAPS: usize = 8;

/// Temporary files of puts older than this were left by a writer that died.
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Maps `file` (at `path`) read-only.
fn map_file(file: &fs::File, path: &Path, len: u64) -> Result<HostBuffer> {
    if len == 0 {
        return Ok(HostBuffer::copy_from(&[]));
    }
    // SAFETY: the mapping is read-only and decoded as untrusted bytes.
    // Entries are never rewritten in place: a put writes a new file and
    // links or renames it over the key, and an eviction unlinks it, so a
    // mapped file keeps its bytes for as long as it is mapped. (A program
    // that truncates an entry in place breaks that; docs/store.md says
    // entries must not be modified.)
    let map =
        unsafe { memmap2::Mmap::map(file) }.map_err(|e| Error::io_path("cannot map", path, e))?;
    Ok(HostBuffer::from_backing(map))
}

impl DirBackend {
    /// The directory store at `dir`, created when absent; put files a
    /// writer abandoned long ago are removed.
    pub(crate) fn open(dir: &Path) -> Result<DirBackend> {
        fs::create_dir_all(dir)
            .map_err(|e| Error::io_path("cannot create the store directory", dir, e))?;
        let store = Self::open_existing(dir)?;
        store.remove_abandoned();
        Ok(store)
    }

    /// The directory store at `dir`, which must exist (a proxy names it:
    /// resolving creates nothing).
    pub(crate) fn open_existing(dir: &Path) -> Result<DirBackend> {
        let dir = fs::canonicalize(dir).map_err(|e| Error::StoreUnreachable {
            store: format!("dir:{}", dir.display()),
            source: Box::new(Error::io_path("cannot open the store directory", dir, e)),
        })?;
        if !dir.is_dir() {
            return Err(Error::Invalid(format!(
                "store `{}` is not a directory",
                dir.display()
            )));
        }
        Ok(DirBackend {
            dir,
            maps: Mutex::default(),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.{EXTENSION}"))
    }

    fn remove_abandoned(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let abandoned = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(".put-"))
                && entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > ABANDONED_AFTER);
            if abandoned {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    fn map(&self, key: &str) -> Result<HostBuffer> {
        let path = self.path(key);
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget(key);
                return Err(not_stored(&self.location(), key));
            }
            Err(e) => return Err(Error::io_path("cannot open", &path, e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| Error::io_path("cannot stat", &path, e))?;
        let id = FileId::of(&meta);
        if let Some((_, _, region)) = lock(&self.maps)
            .iter()
            .find(|(k, known, _)| k == key && *known == id)
        {
            return Ok(region.clone());
        }
        let region = map_file(&file, &path, id.len)?;
        let mut maps = lock(&self.maps);
        // Let go of this key's old mapping, and of any whose file was
        // removed or replaced since (by any process).
        maps.retain(|(k, known, _)| {
            k != key && fs::metadata(self.path(k)).is_ok_and(|m| FileId::of(&m) == *known)
        });
        if maps.len() >= KEPT_MAPS {
            maps.remove(0);
        }
        maps.push((key.to_string(), id, region.clone()));
        Ok(region)
    }

    /// Forgets the mapping kept for `key` (evicted or replaced here).
    fn forget(&self, key: &str) {
        lock(&self.maps).retain(|(k, _, _)| k != key);
    }

    /// Makes the directory's new names durable (a link or rename).
    fn sync_dir(&self) {
        if let Ok(d) = fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
    }
}

impl Backend for DirBackend {
    fn location(&self) -> Location {
        Location::Dir {
            path: self.dir.clone(),
        }
    }

    fn put(&self, key: &str, message: &Message, overwrite: Overwrite) -> Result<Manifest> {
        let target = self.path(key);
        if overwrite == Overwrite::Refuse && target.exists() {
            return Err(already_stored(&self.location(), key));
        }
        let frame = encode_stored(key, message)?;
        let temp = self
            .dir
            .join(format!(".put-{}-{}", std::process::id(), super::new_key()));
        let written = (|| -> std::io::Result<fs::File> {
            let mut file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&temp)?;
            let mut out = std::io::BufWriter::with_capacity(1 << 20, &mut file);
            write_frame(&frame, &mut out)?;
            out.flush()?;
            drop(out);
            file.sync_data()?;
            Ok(file)
        })();
        // The manifest of what was written, read back before the file is
        // placed (so another writer of the key cannot slip in between).
        let manifest = written
            .map_err(|e| Error::io_path("cannot write the store entry", &temp, e))
            .and_then(|file| {
                let len = file
                    .metadata()
                    .map_err(|e| Error::io_path("cannot stat", &temp, e))?
                    .len();
                decode_stored(key, &self.location(), &map_file(&file, &temp, len)?)
            })
            .map(|(_, manifest)| manifest);
        let placed = match &manifest {
            Ok(_) => match overwrite {
                // A hard link fails when the key exists: two writers racing
                // for one key cannot both win.
                Overwrite::Refuse => fs::hard_link(&temp, &target),
                Overwrite::Replace => fs::rename(&temp, &target),
            },
            Err(_) => Ok(()),
        };
        let _ = fs::remove_file(&temp);
        self.forget(key);
        let manifest = manifest?;
        match placed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(already_stored(&self.location(), key))
            }
            Err(e) => return Err(Error::io_path("cannot write the store entry", &target, e)),
        }
        self.sync_dir();
        Ok(manifest)
    }

    fn get(&self, key: &str) -> Result<(Message, Manifest)> {
        decode_stored(key, &self.location(), &self.map(key)?)
    }

    fn manifest(&self, key: &str) -> Result<Manifest> {
        Ok(self.get(key)?.1)
    }

    fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.path(key).is_file())
    }

    fn evict(&self, key: &str) -> Result<bool> {
        self.forget(key);
        let path = self.path(key);
        match fs::remove_file(&path) {
            Ok(()) => {
                self.sync_dir();
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io_path("cannot remove", &path, e)),
        }
    }

    fn list(&self) -> Result<Vec<Entry>> {
        let entries =
            fs::read_dir(&self.dir).map_err(|e| Error::io_path("cannot read", &self.dir, e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io_path("cannot read", &self.dir, e))?;
            let name = entry.file_name();
            let Some(key) = name
                .to_str()
                .and_then(|n| n.strip_suffix(EXTENSION).and_then(|n| n.strip_suffix('.')))
            else {
                continue;
            };
            if super::check_key(key).is_err() {
                continue;
            }
            let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
            out.push(Entry {
                key: key.to_string(),
                bytes,
            });
        }
        Ok(out)
    }
}

/// Another backend under the location of the node that serves it.
pub(crate) struct Relocated {
    pub(crate) inner: Arc<dyn Backend>,
    pub(crate) location: Location,
}

impl Backend for Relocated {
    fn location(&self) -> Location {
        self.location.clone()
    }
    fn put(&self, key: &str, message: &Message, overwrite: Overwrite) -> Result<Manifest> {
        self.inner.put(key, message, overwrite)
    }
    fn get(&self, key: &str) -> Result<(Message, Manifest)> {
        self.inner.get(key)
    }
    fn manifest(&self, key: &str) -> Result<Manifest> {
        self.inner.manifest(key)
    }
    fn exists(&self, key: &str) -> Result<bool> {
        self.inner.exists(key)
    }
    fn evict(&self, key: &str) -> Result<bool> {
        self.inner.evict(key)
    }
    fn list(&self) -> Result<Vec<Entry>> {
        self.inner.list()
    }
    fn remote(&self) -> Option<&RemoteBackend> {
        self.inner.remote()
    }
}
