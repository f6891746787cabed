//! The CUDA runtime in a build without the `cuda` feature: the types exist,
//! none can be made, and opening says how to get them.

use std::io::Read;

use super::NOT_BUILT;
use crate::cpu::Checksum;
use crate::error::{Error, Result};
use crate::runtime::pinned::PinnedConfig;
use crate::{DType, Layout};

/// Uninhabited: no value exists, so every method below is unreachable.
#[derive(Clone)]
pub(super) enum Runtime {}
pub(super) enum Buffer {}
pub(super) enum Event {}
pub(super) enum Feed {}

impl Runtime {
    pub(super) fn open(_index: u32) -> Result<Self> {
        Err(Error::Unavailable {
            runtime: "cuda",
            reason: NOT_BUILT.to_string(),
        })
    }
    pub(super) fn fork(&self) -> Result<Self> {
        match *self {}
    }
    pub(super) fn index(&self) -> u32 {
        match *self {}
    }
    pub(super) fn alloc(&self, _len: usize) -> Result<Buffer> {
        match *self {}
    }
    pub(super) fn write(&self, _dst: &mut Buffer, _offset: usize, _src: &[u8]) -> Result<()> {
        match *self {}
    }
    pub(super) fn read(&self, _src: &Buffer, _offset: usize, _dst: &mut [u8]) -> Result<()> {
        match *self {}
    }
    pub(super) fn upload_from(&self, _reader: &mut impl Read, _len: usize) -> Result<Buffer> {
        match *self {}
    }
    pub(super) fn begin_upload(&self, _len: usize) -> Result<Feed> {
        match *self {}
    }
    pub(super) fn download_to(
        &self,
        _src: &Buffer,
        _sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<()> {
        match *self {}
    }
    pub(super) fn pinned(&self) -> PinnedConfig {
        match *self {}
    }
    pub(super) fn set_pinned(&self, _config: PinnedConfig) {
        match *self {}
    }
    pub(super) fn copy(&self, _src: &Buffer, _dst: &mut Buffer) -> Result<()> {
        match *self {}
    }
    pub(super) fn cast(
        &self,
        _src: &Buffer,
        _from: DType,
        _dst: &mut Buffer,
        _to: DType,
    ) -> Result<()> {
        match *self {}
    }
    pub(super) fn checksum(&self, _buf: &Buffer) -> Result<Checksum> {
        match *self {}
    }
    pub(super) fn pack(&self, _s: &Buffer, _e: usize, _l: &Layout, _o: &mut Buffer) -> Result<()> {
        match *self {}
    }
    pub(super) fn unpack(
        &self,
        _p: &Buffer,
        _e: usize,
        _l: &Layout,
        _s: &mut Buffer,
    ) -> Result<()> {
        match *self {}
    }
    pub(super) fn record_event(&self) -> Result<Event> {
        match *self {}
    }
    pub(super) fn wait_event(&self, _event: &Event) -> Result<()> {
        match *self {}
    }
    pub(super) fn synchronize(&self) -> Result<()> {
        match *self {}
    }
}

impl Buffer {
    pub(super) fn owner(&self) -> Result<Runtime> {
        match *self {}
    }
    pub(super) fn len(&self) -> usize {
        match *self {}
    }
    pub(super) fn index(&self) -> u32 {
        match *self {}
    }
}

impl Event {
    pub(super) fn synchronize(&self) -> Result<()> {
        match *self {}
    }
}

impl Feed {
    pub(super) fn len(&self) -> usize {
        match *self {}
    }
    pub(super) fn position(&self) -> usize {
        match *self {}
    }
    pub(super) fn space(&mut self) -> Result<&mut [u8]> {
        match *self {}
    }
    pub(super) fn advance(&mut self, _n: usize) -> Result<()> {
        match *self {}
    }
    pub(super) fn pause(&mut self) -> Result<()> {
        match *self {}
    }
    pub(super) fn finish(self) -> Result<Buffer> {
        match self {}
    }
}
