//! The tensorferry engine: tensors, messages, the wire format and transports.
//!
//! The main type is [`Message`]: JSON fields plus an ordered list of named
//! [`Tensor`]s (and values of your own types through a [`Codec`]). A tensor's
//! host bytes are a [`HostBuffer`]: aligned, reference-counted, and possibly a
//! view into a received frame or a mapped file. [`wire::encode`] turns a
//! message into header bytes plus a list of buffers, and
//! [`outbound::write_frame`] sends them with one vectored write (reading
//! back any buffer still on a device as it goes); [`wire::decode`] turns a
//! frame back into a message whose tensors view the frame without copying,
//! after checking every length against the bytes present and the configured
//! [`wire::Limits`]. [`file`](mod@file) records and replays frames (`file://`).
//! [`auth`] holds the `tcp://` handshake of peers sharing a [`Secret`],
//! as bytes in and bytes out.
//!
//! # Examples
//!
//! ```
//! use tensorferry_engine::wire::{self, EncodeOptions, FrameMeta, Limits};
//! use tensorferry_engine::{outbound, HostBuffer, Message, Tensor};
//!
//! let image = Tensor::from_slice(&[0.25f32; 6], &[2, 3])?;
//! let msg = Message::new().field("step", 17).tensor("image", image.transpose(0, 1)?);
//! let frame = wire::encode(&msg, &FrameMeta::message("/camera", 17), EncodeOptions { checksums: true, ..EncodeOptions::default() })?;
//! let mut bytes = Vec::new();
//! outbound::write_frame(&frame, &mut bytes)?; // one vectored write of head + buffers
//!
//! let got = wire::decode(&HostBuffer::copy_from(&bytes), &Limits::default())?;
//! assert_eq!(got.meta.channel, "/camera");
//! assert_eq!(got.verify_checksums()?, 1);
//! assert_eq!(got.message.get("image").map(|t| t.shape().to_vec()), Some(vec![3, 2]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod address;
mod buffer;
mod codec;
pub mod delivery;
pub mod dlpack;
mod error;
pub mod futex;
mod message;
mod node;
pub mod outbound;
pub mod pattern;
mod pool;
mod queue;
mod reactor;
pub mod safetensors;
mod service;
mod signal;
mod spin;
pub mod store;
mod tensor;
mod transport;
pub mod wire;

pub use transport::auth;
pub use transport::auth::Secret;
pub use transport::file;
pub use transport::tls::TlsConfig;

pub use address::Address;
pub use buffer::{Backing, HostBuffer, HostBufferMut, ALIGN};
pub use codec::{Codec, CodecRegistry};
pub use error::{Error, Result};
pub use message::{Message, Object};
pub use node::{
    ChannelStats, Loan, LostSubscriber, Node, NodeBuilder, NodeStats, Publisher, Received,
    Recording, RecvFuture, RequestFuture, SendFuture, SubscribersFuture, Subscription,
    ALL_CHANNELS,
};
pub use pool::{BufferPool, PooledBuffer};
pub use service::{Dim, Handler, Schema, Service, ServiceError};
pub use tensor::{packed_bytes, Storage, Tensor};
pub use tensorferry_kernels::{DType, Element};
