//! `file://PATH`: record and replay. A recording is frames back to back,
//! exactly as they travel on a socket; [`FileWriter`] appends them and
//! [`FileReader`] maps the file and reads them back, checking each as if it
//! came from the network, with tensors that view the mapping.
//!
//! As a transport, a `file://` connection carries frames one way: a node
//! records a channel by sending frames to one (`Node::record`) and replays
//! one by reading frames from it (`Node::subscribe("file://…", channel)`).

use std::fs::{File as StdFile, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Carry, Connection, Context, Flow, Listener, Outgoing, ReadStop, Transport};
use crate::address::Address;
use crate::buffer::HostBuffer;
use crate::error::{Error, Result};
use crate::outbound::write_frame;
use crate::wire::{decode_at, Encoded, Frame, Limits};

/// Appends frames to a record file.
#[derive(Debug)]
pub struct FileWriter {
    file: StdFile,
    path: PathBuf,
    written: u64,
}

impl FileWriter {
    /// Creates (or truncates) `path`.
    ///
    /// # Errors
    ///
    /// When the file cannot be created.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = StdFile::create(&path).map_err(|e| Error::io_path("cannot create", &path, e))?;
        Ok(Self {
            file,
            path,
            written: 0,
        })
    }

    /// Opens `path` for appending, creating it if absent.
    ///
    /// # Errors
    ///
    /// When the file cannot be opened.
    pub fn append(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io_path("cannot open", &path, e))?;
        Ok(Self {
            file,
            path,
            written: 0,
        })
    }

    /// Writes one frame with vectored writes (buffers still on a device
    /// are read back as they are written).
    ///
    /// # Errors
    ///
    /// When the write fails, or a device buffer cannot be read back.
    pub fn write(&mut self, frame: &Encoded) -> Result<()> {
        write_frame(frame, &mut self.file)
            .map_err(|e| Error::io_path("cannot write to", &self.path, e))?;
        self.written += frame.frame_len();
        Ok(())
    }

    /// Bytes written through this writer.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Flushes to stable storage.
    ///
    /// # Errors
    ///
    /// When the flush fails.
    pub fn sync(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io_path("cannot sync", &self.path, e))
    }
}

/// Reads the frames of a record file. The file is mapped, so tensors view it
/// without copying; every frame is checked as if it came from the network.
///
/// # Examples
///
/// ```no_run
/// use tensorferry_engine::file::FileReader;
///
/// for frame in FileReader::open("run.tfm")? {
///     let frame = frame?;
///     println!("{} #{}: {} tensors", frame.meta.channel, frame.meta.seq, frame.tensors.len());
/// }
/// # Ok::<(), tensorferry_engine::Error>(())
/// ```
#[derive(Debug)]
pub struct FileReader {
    region: HostBuffer,
    offset: u64,
    limits: Limits,
    failed: bool,
}

impl FileReader {
    /// Maps `path` for reading with default limits.
    ///
    /// # Errors
    ///
    /// When the file cannot be opened or mapped.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with_limits(path, Limits::default())
    }

    /// Maps `path` for reading with `limits`.
    ///
    /// # Errors
    ///
    /// When the file cannot be opened or mapped.
    pub fn open_with_limits(path: impl AsRef<Path>, limits: Limits) -> Result<Self> {
        let path = path.as_ref();
        let file = StdFile::open(path).map_err(|e| Error::io_path("cannot open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io_path("cannot stat", path, e))?
            .len();
        let region = if len == 0 {
            HostBuffer::copy_from(&[])
        } else {
            // SAFETY: the mapping is read-only and its bytes are treated as
            // untrusted input: every length is checked before use. Another
            // process truncating the file while it is mapped would fault the
            // reader; record files are not shared for writing while replayed.
            let map = unsafe { memmap2::Mmap::map(&file) }
                .map_err(|e| Error::io_path("cannot map", path, e))?;
            HostBuffer::from_backing(map)
        };
        Ok(Self {
            region,
            offset: 0,
            limits,
            failed: false,
        })
    }

    /// Byte offset of the next frame.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes in the file.
    pub fn len(&self) -> u64 {
        self.region.len() as u64
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.region.is_empty()
    }
}

impl Iterator for FileReader {
    type Item = Result<Frame>;

    /// The next frame; after an error, iteration ends (what follows a damaged
    /// frame cannot be located).
    fn next(&mut self) -> Option<Result<Frame>> {
        if self.failed || self.offset >= self.region.len() as u64 {
            return None;
        }
        let rest = self
            .region
            .slice(self.offset as usize..self.region.len())
            .expect("offset is within the file");
        match decode_at(&rest, &self.limits, self.offset) {
            Ok(frame) => {
                self.offset += frame.frame_len;
                Some(Ok(frame))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// The `file://` transport.
pub(crate) struct File;

impl Transport for File {
    fn listen(&self, addr: &Address, _public: bool, _ctx: &Context) -> Result<Box<dyn Listener>> {
        Err(Error::Invalid(format!(
            "a node cannot listen on {addr}; use inproc://, shm:// or tcp://, and Node::record(\"{addr}\", channel) to record to a file"
        )))
    }

    /// A recording is not a peer: it is written by [`FileConn::record`]
    /// and read by [`FileConn::replay`], which the node opens for
    /// `Node::record` and for a subscription to a `file://` address.
    fn connect(&self, addr: &Address, _ctx: &Context) -> Result<Arc<dyn Connection>> {
        Err(Error::Invalid(format!(
            "cannot connect to {addr}: replay a recording with Node::subscribe(\"{addr}\", channel) and make one with Node::record(\"{addr}\", channel)"
        )))
    }
}

/// A recording being written or replayed, as a connection.
pub(crate) struct FileConn {
    label: String,
    reader: Option<Mutex<FileReader>>,
    writer: Option<Mutex<FileWriter>>,
}

impl FileConn {
    /// A recording at `path`, for replay: its frames are checked with `limits`.
    ///
    /// # Errors
    ///
    /// When the file cannot be opened or mapped.
    pub(crate) fn replay(path: &Path, limits: Limits) -> Result<FileConn> {
        Ok(FileConn {
            label: format!("file://{}", path.display()),
            reader: Some(Mutex::new(FileReader::open_with_limits(path, limits)?)),
            writer: None,
        })
    }

    /// The recording's next frame; `None` after the last one (or after a
    /// damaged one, reported once).
    pub(crate) fn next_frame(&self) -> Option<Result<Frame>> {
        self.reader
            .as_ref()
            .and_then(|r| r.lock().unwrap_or_else(|p| p.into_inner()).next())
    }

    /// A new recording at `path` (created, or replaced).
    ///
    /// # Errors
    ///
    /// When the file cannot be created.
    pub(crate) fn record(path: &Path) -> Result<FileConn> {
        Ok(FileConn {
            label: format!("file://{}", path.display()),
            reader: None,
            writer: Some(Mutex::new(FileWriter::create(path)?)),
        })
    }

    /// Flushes a recording to stable storage.
    ///
    /// # Errors
    ///
    /// When the flush fails.
    pub(crate) fn sync(&self) -> Result<()> {
        match &self.writer {
            Some(w) => w.lock().unwrap_or_else(|p| p.into_inner()).sync(),
            None => Ok(()),
        }
    }
}

impl Connection for FileConn {
    fn label(&self) -> &str {
        &self.label
    }

    fn carries(&self) -> Carry {
        Carry::Frames
    }

    /// Appends a frame (the file is written on the caller's thread).
    fn send(
        &self,
        item: Outgoing,
        _lane: Option<Arc<super::Lane>>,
    ) -> std::result::Result<(), String> {
        let (Some(writer), Outgoing::Frame(frame)) = (&self.writer, item) else {
            return Err(format!("{} is not open for recording frames", self.label));
        };
        writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(&frame)
            .map_err(|e| e.to_string())
    }

    /// The recording's next frames, until the handler stalls or the file ends.
    fn read(&self, on_frame: &mut dyn FnMut(Frame) -> Flow, _how: super::Reading) -> ReadStop {
        if self.reader.is_none() {
            return ReadStop::Idle;
        }
        loop {
            match self.next_frame() {
                Some(Ok(frame)) => {
                    if on_frame(frame) == Flow::Stall {
                        return ReadStop::Stalled;
                    }
                }
                Some(Err(e)) => return ReadStop::Broken(e.to_string()),
                None => return ReadStop::Ended("the end of the recording".into()),
            }
        }
    }

    fn close(&self, _why: &str) {
        if let Some(w) = &self.writer {
            let _ = w.lock().unwrap_or_else(|p| p.into_inner()).sync();
        }
    }
}
