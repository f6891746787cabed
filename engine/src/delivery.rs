//! Delivery: where each tensor of a message lands, and getting it there.
//!
//! A [`Delivery`] holds one channel's rules — its device map (or, for
//! replies, the reverse of it), the fallback policy, the wire casts and
//! whether tensors carry checksums — resolved against the devices this host
//! has. It works on both ends of a channel:
//!
//! - [`Delivery::prepare`] (sender): each tensor is cast to its wire dtype and
//!   checksummed **on the device that holds it**; a device tensor stays
//!   there, and the encoded frame reads it back while it is written (CUDA
//!   through pinned chunks, a chunk on the socket while the next is copied;
//!   wgpu through mapped staging buffers). What the header must say of it (its device, its dtype before
//!   the cast, its checksum) comes back as an [`Origin`] per tensor.
//! - [`Delivery::land`] (receiver): each tensor goes to the device the map
//!   resolves its source device to; its checksum is verified there, after
//!   the copy, and it is cast back to the sender's dtype there (unless the
//!   channel keeps the wire dtype). Any failure rejects the whole message:
//!   nothing is half-delivered.
//!
//! # Examples
//!
//! ```
//! use std::sync::Arc;
//! use tensorferry_device_map::{ChannelSpec, Device, Inventory, Pattern};
//! use tensorferry_engine::delivery::{Direction, Delivery};
//! use tensorferry_engine::{DType, Message, Tensor};
//!
//! let spec = ChannelSpec::new(Pattern::PubSub).with_wire_dtype("f32", "bf16").with_checksum(true);
//! let delivery = Delivery::new(&spec, Direction::Forward, Some(Arc::new(Inventory::cpu_only())))?;
//! let m = Message::new().tensor("x", Tensor::from_slice(&[1.5f32, -2.0], &[2])?);
//! let (wire, origins) = delivery.prepare(&m)?;
//! assert_eq!(wire.get("x").map(Tensor::dtype), Some(DType::BF16)); // half the bytes travel
//! assert_eq!(origins[0].cast_from, Some(DType::F32));
//! # Ok::<(), tensorferry_engine::Error>(())
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tensorferry_device_map::{
    resolve, ChannelConfig, ChannelSpec, Device, DeviceMap, Fallback, Inventory, Located, Reason,
};
use tensorferry_kernels::runtime::{HostReport, Runtime};
use tensorferry_kernels::{cast, cpu, DType};

use crate::buffer::HostBufferMut;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::tensor::Tensor;
use crate::wire::{Origin, TensorInfo};

/// Which way a message travels on its channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Messages and requests: the channel's map as written.
    Forward,
    /// Replies: the reverse of the map, so a reply computed on the mapped
    /// device returns to the device its request came from.
    Reply,
}

/// Where one tensor landed, and why there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Landing {
    /// The tensor's name.
    pub name: String,
    /// The device it was on at the sender.
    pub source: Device,
    /// The device it is on now.
    pub device: Device,
    /// The map rule that chose the device.
    pub reason: Reason,
    /// The dtype it travelled in.
    pub wire_dtype: DType,
    /// The dtype it was delivered in.
    pub dtype: DType,
    /// True when a checksum was verified on `device`.
    pub verified: bool,
}

/// One channel's delivery rules on this host; see the [module docs](self).
#[derive(Debug)]
pub struct Delivery {
    map: DeviceMap,
    fallback: Fallback,
    inventory: OnceLock<Arc<Inventory>>,
    wire: Vec<(DType, DType)>,
    keep_wire: bool,
    checksum: bool,
    runtimes: Mutex<HashMap<Device, Runtime>>,
    /// Each source device's resolved target: resolved once per channel and
    /// direction, then shared by the reader that routes a frame's bytes and
    /// the landing that puts them there.
    targets: Mutex<Vec<(Device, Device, Reason)>>,
}

/// The devices this process can reach (probed once, then shared).
pub fn host_inventory() -> Arc<Inventory> {
    static INVENTORY: OnceLock<Arc<Inventory>> = OnceLock::new();
    Arc::clone(INVENTORY.get_or_init(|| Arc::new(HostReport::probe().inventory())))
}

/// Bad `wire_dtype` entries: `(key as written, what is wrong)`.
pub type WireErrors = Vec<(String, String)>;

/// Reads a channel's `wire_dtype` table into dtypes, checking every name and cast.
///
/// # Errors
///
/// Every bad entry.
pub fn wire_casts(spec: &ChannelSpec) -> std::result::Result<Vec<(DType, DType)>, WireErrors> {
    let mut casts = Vec::new();
    let mut errors = Vec::new();
    for (from, to) in &spec.wire_dtype {
        let parsed = from
            .parse::<DType>()
            .and_then(|f| to.parse::<DType>().map(|t| (f, t)));
        match parsed {
            Err(e) => errors.push((from.clone(), e.to_string())),
            Ok((f, t)) if !cast::is_supported(f, t) || !cast::is_supported(t, f) => errors.push((
                from.clone(),
                format!(
                    "{f} cannot travel as {t}: the cast must exist both ways ({})",
                    cast::SUPPORTED
                ),
            )),
            Ok((f, _)) if casts.iter().any(|(g, _)| *g == f) => errors.push((
                from.clone(),
                format!("{f} is given a wire dtype twice (under another spelling); keep one"),
            )),
            Ok((f, t)) => casts.push((f, t)),
        }
    }
    if errors.is_empty() {
        Ok(casts)
    } else {
        Err(errors)
    }
}

/// Checks a configuration file whole — the one check behind `check-map`,
/// the CLI's `--config` and [`crate::NodeBuilder::build`]: every error of
/// its device maps, fallbacks and queue settings (as
/// [`tensorferry_device_map::check`] finds them) and of its wire dtypes
/// (names that do not parse, casts that do not exist both ways), each with
/// its place in the file, and each valid channel's table resolved against
/// `inventory`.
///
/// # Examples
///
/// ```
/// use tensorferry_device_map::Inventory;
/// use tensorferry_engine::delivery;
///
/// let text = r#"{"channels": {"/act": {"device_map": {"cuda:0": "cuda:9"}, "wire_dtype": {"f32": "int4"}}}}"#;
/// let report = delivery::check(text, &Inventory::cpu_only());
/// let places: Vec<&str> = report.errors.iter().map(|e| e.path.as_str()).collect();
/// assert!(places.iter().any(|p| p.contains("wire_dtype")), "{places:?}");
/// assert!(!report.is_valid());
/// ```
pub fn check(text: &str, inventory: &Inventory) -> tensorferry_device_map::CheckReport {
    let mut report = tensorferry_device_map::check(text, inventory);
    let parsed = ChannelConfig::parse(text);
    report.errors.extend(validate_specs(
        parsed.attempted.iter().map(|(n, s)| (n.as_str(), s)),
    ));
    report
}

/// Reads a configuration file for a node (the CLI's `--config`): every
/// error of the file at once, maps and wire dtypes alike, each with its
/// place.
///
/// # Errors
///
/// A file that cannot be read; [`tensorferry_device_map::Error::Invalid`]
/// listing every error.
pub fn load_config(path: impl AsRef<std::path::Path>) -> Result<ChannelConfig> {
    let path = path.as_ref();
    let text =
        std::fs::read_to_string(path).map_err(|source| tensorferry_device_map::Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let parsed = ChannelConfig::parse(&text);
    let mut errors = parsed.errors;
    errors.extend(validate_specs(
        parsed.attempted.iter().map(|(n, s)| (n.as_str(), s)),
    ));
    if errors.is_empty() {
        let mut config = parsed.config;
        if let Some(dir) = path.parent() {
            config.node_mut().relative_to(dir);
        }
        Ok(config)
    } else {
        Err(tensorferry_device_map::Error::Invalid { errors }.into())
    }
}

/// Every wire-dtype error of a configuration already in memory (its maps
/// were checked when it was built), each with its place.
pub fn validate(config: &ChannelConfig) -> Vec<Located> {
    validate_specs(config.iter())
}

/// As [`validate`], for channels given one by one (such as
/// [`tensorferry_device_map::Parsed::attempted`]).
pub fn validate_specs<'a>(
    specs: impl IntoIterator<Item = (&'a str, &'a ChannelSpec)>,
) -> Vec<Located> {
    let mut out = Vec::new();
    for (name, spec) in specs {
        if let Err(errors) = wire_casts(spec) {
            for (key, what) in errors {
                out.push(Located {
                    channel: Some(name.to_string()),
                    path: format!(
                        "channels[{}].wire_dtype[{}]",
                        serde_json::Value::from(name),
                        serde_json::Value::from(key)
                    ),
                    error: tensorferry_device_map::Error::WireDtype { what },
                });
            }
        }
    }
    out
}

impl Delivery {
    /// The rules of a channel with `spec`, for messages travelling `direction`,
    /// on a host that has `inventory` (`None`: this host's devices, probed
    /// when a tensor first needs a target).
    ///
    /// # Errors
    ///
    /// A `wire_dtype` entry that is not a supported cast; a reply map that
    /// cannot be reversed.
    pub fn new(
        spec: &ChannelSpec,
        direction: Direction,
        inventory: Option<Arc<Inventory>>,
    ) -> Result<Self> {
        let wire = wire_casts(spec).map_err(|errors| {
            let list: Vec<String> = errors
                .into_iter()
                .map(|(k, what)| format!("wire_dtype[\"{k}\"]: {what}"))
                .collect();
            Error::Invalid(list.join("; "))
        })?;
        let map = match direction {
            Direction::Forward => spec.device_map.clone(),
            Direction::Reply => spec.reply_map()?,
        };
        Ok(Self {
            map,
            fallback: spec.fallback,
            inventory: inventory.map(OnceLock::from).unwrap_or_default(),
            wire,
            keep_wire: spec.keep_wire_dtype,
            checksum: spec.checksum,
            runtimes: Mutex::new(HashMap::new()),
            targets: Mutex::new(Vec::new()),
        })
    }

    /// True when a message whose tensors all come from the host passes
    /// through unchanged: no wire casts, no checksums, and the map sends
    /// `cpu` to `cpu`.
    pub fn passes_host_tensors(&self) -> bool {
        self.wire.is_empty()
            && !self.checksum
            && self
                .map
                .entry(Device::Cpu)
                .is_none_or(|e| e.target == Device::Cpu)
            && (self.map.entry(Device::Cpu).is_some()
                || self.map.default_target().is_none_or(|d| d == Device::Cpu))
    }

    /// True when host tensors need preparing before they travel: the
    /// channel casts some dtype or checksums tensors.
    pub fn prepares_host_tensors(&self) -> bool {
        !self.wire.is_empty() || self.checksum
    }

    /// The device a tensor sent from `source` lands on, and why.
    ///
    /// # Errors
    ///
    /// [`tensorferry_device_map::Error::MissingDevice`] under the `error` fallback.
    pub fn target(&self, source: Device) -> Result<(Device, Reason)> {
        let mut known = self
            .targets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, target, reason)) = known.iter().find(|(s, _, _)| *s == source) {
            return Ok((*target, reason.clone()));
        }
        let inventory = self.inventory.get_or_init(host_inventory);
        let r = resolve(&self.map, self.fallback, source, inventory)?;
        known.push((source, r.target, r.reason.clone()));
        Ok((r.target, r.reason))
    }

    /// The runtime of `device`, opened once per channel and direction.
    ///
    /// # Errors
    ///
    /// When the device cannot be opened.
    pub fn runtime_for(&self, device: Device) -> Result<Runtime> {
        self.runtime(device)
    }

    fn runtime(&self, device: Device) -> Result<Runtime> {
        if device == Device::Cpu {
            return Ok(Runtime::Cpu);
        }
        let mut cache = self
            .runtimes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(rt) = cache.get(&device) {
            return Ok(rt.clone());
        }
        let rt = Runtime::open(device)?;
        cache.insert(device, rt.clone());
        Ok(rt)
    }

    fn wire_dtype(&self, dtype: DType) -> Option<DType> {
        self.wire
            .iter()
            .find(|(f, t)| *f == dtype && *t != dtype)
            .map(|(_, t)| *t)
    }

    /// Sender side: every tensor cast to its wire dtype and checksummed on
    /// its own device (where device tensors stay); returns the message to
    /// encode and one [`Origin`] per tensor (for
    /// [`crate::wire::encode_staged`]).
    ///
    /// # Errors
    ///
    /// [`Error::Tensor`] naming the tensor whose cast, checksum or copy failed.
    pub fn prepare(&self, message: &Message) -> Result<(Message, Vec<Origin>)> {
        let mut origins = Vec::with_capacity(message.tensors().len());
        let tensors = message
            .tensors()
            .map(|(name, t)| {
                let (tensor, origin) = self
                    .prepare_one(t)
                    .map_err(|e| Error::tensor(name, e.to_string()))?;
                origins.push(origin);
                Ok((name.to_string(), tensor))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((message.with_tensors(tensors), origins))
    }

    fn prepare_one(&self, t: &Tensor) -> Result<(Tensor, Origin)> {
        let device = t.device();
        let cast_to = self.wire_dtype(t.dtype());
        let rt = self.runtime(device)?;
        let (tensor, checksum) = if device == Device::Cpu {
            let tensor = match cast_to {
                None => t.clone(),
                Some(to) => cast_on_host(t, to)?,
            };
            let sum = self
                .checksum
                .then(|| tensor.packed().map(|b| cpu::checksum(b.as_slice())))
                .transpose()?;
            (tensor, sum)
        } else {
            // On the device: pack, cast and checksum there. The wire bytes
            // stay there too: the frame reads them back chunk by chunk as it
            // is written (`wire::Payload::Device`).
            let mut on = t.to_runtime(&rt)?;
            if let Some(to) = cast_to {
                on = cast_on(&rt, &on, to)?;
            }
            let buf = on.device_buffer().ok_or_else(|| {
                Error::Invalid(format!("a tensor on {device} has no device buffer"))
            })?;
            let sum = self.checksum.then(|| rt.checksum(buf)).transpose()?;
            (on, sum)
        };
        Ok((
            tensor,
            Origin {
                device,
                cast_from: cast_to.map(|_| t.dtype()),
                checksum,
            },
        ))
    }

    /// Receiver side: every tensor of `message` on its target device,
    /// verified and cast back there. `infos` is what the sender's header
    /// said of each tensor (empty for a message that never left the
    /// process: then each tensor's own device is its source).
    ///
    /// # Errors
    ///
    /// [`Error::Tensor`] naming the first tensor whose target is missing
    /// (under the `error` fallback), whose checksum does not match, or whose
    /// copy or cast failed. The message is not delivered.
    pub fn land(&self, message: Message, infos: &[TensorInfo]) -> Result<(Message, Vec<Landing>)> {
        let mut landings = Vec::with_capacity(message.tensors().len());
        let tensors = message
            .tensors()
            .enumerate()
            .map(|(i, (name, t))| {
                let (tensor, landing) =
                    self.land_one(name, t, infos.get(i)).map_err(|e| match e {
                        Error::Tensor { .. } => e,
                        other => Error::tensor(name, other.to_string()),
                    })?;
                landings.push(landing);
                Ok((name.to_string(), tensor))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((message.with_tensors(tensors), landings))
    }

    fn land_one(
        &self,
        name: &str,
        t: &Tensor,
        info: Option<&TensorInfo>,
    ) -> Result<(Tensor, Landing)> {
        let source = info.map_or(t.device(), |i| i.device);
        let (target, reason) = self.target(source)?;
        let want = info.and_then(|i| i.checksum);
        if self.checksum && info.is_some() && want.is_none() {
            return Err(Error::tensor(
                name,
                "this channel requires checksums but the sender sent none; set \"checksum\": true on the sender's channel too",
            ));
        }
        let rt = self.runtime(target)?;
        let mut landed = t.to_runtime(&rt)?;
        if let Some(want) = want {
            let got = match landed.device_buffer() {
                Some(buf) => rt.checksum(buf)?,
                None => cpu::checksum(landed.packed()?.as_slice()),
            };
            if got != want {
                return Err(Error::tensor(
                    name,
                    format!(
                        "checksum mismatch on {target}: the sender computed {want}, the bytes received give {got}; the message was dropped"
                    ),
                ));
            }
        }
        let wire_dtype = landed.dtype();
        let cast_from = info.and_then(|i| i.cast_from);
        if let Some(from) = cast_from {
            // Only a cast this channel names is undone: a peer cannot make
            // the receiver widen tensors (and allocate) as it pleases.
            if !self
                .wire
                .iter()
                .any(|(f, t)| *f == from && *t == wire_dtype)
            {
                return Err(Error::tensor(
                    name,
                    format!(
                        "the sender cast {from} to {wire_dtype} for the wire, but this channel's wire_dtype does not name that cast; add {{\"{from}\": \"{wire_dtype}\"}} to it"
                    ),
                ));
            }
        }
        if let Some(from) = cast_from.filter(|_| !self.keep_wire) {
            landed = if target == Device::Cpu {
                cast_on_host(&landed, from)?
            } else {
                cast_on(&rt, &landed, from)?
            };
        }
        Ok((
            landed.clone(),
            Landing {
                name: name.to_string(),
                source,
                device: target,
                reason,
                wire_dtype,
                dtype: landed.dtype(),
                verified: want.is_some(),
            },
        ))
    }
}

/// `t` (on the host) cast to `to`, in a new host buffer.
fn cast_on_host(t: &Tensor, to: DType) -> Result<Tensor> {
    let packed = t.packed()?;
    let mut out = HostBufferMut::zeroed(cast::output_bytes(packed.len(), t.dtype(), to)?);
    cpu::cast(packed.as_slice(), t.dtype(), out.as_mut_slice(), to)?;
    Tensor::from_host(to, t.shape(), out.freeze())
}

/// `t` (contiguous, on `rt`'s device) cast to `to` on that device.
fn cast_on(rt: &Runtime, t: &Tensor, to: DType) -> Result<Tensor> {
    let src = t.device_buffer().ok_or_else(|| {
        Error::Invalid(format!("a tensor on {} has no device buffer", t.device()))
    })?;
    let mut out = rt.alloc(cast::output_bytes(src.len(), t.dtype(), to)?)?;
    rt.cast(src, t.dtype(), &mut out, to)?;
    Tensor::from_device(to, t.shape(), out)
}
