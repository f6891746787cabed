//! `file://` record and replay: a file of frames back to back.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::buffer::HostBuffer;
use crate::error::{Error, Result};
use crate::outbound::write_frame;
use crate::wire::{decode_at, Encoded, Frame, Limits};

/// Appends frames to a record file.
#[derive(Debug)]
pub struct FileWriter {
    file: File,
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
        let file = File::create(&path).map_err(|e| Error::io_path("cannot create", &path, e))?;
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
        let file = File::open(path).map_err(|e| Error::io_path("cannot open", path, e))?;
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
