//! tensorferry: GPU-aware tensor transport.
//!
//! The main type is [`Node`], built with [`Node::builder`] ([`NodeBuilder`]):
//! it listens and connects over `inproc://`, `shm://` and `tcp://`, and on
//! named channels it publishes ([`Publisher`]), subscribes ([`Subscription`],
//! each message a [`Received`]), serves requests ([`Service`], checked
//! against a [`Schema`]) and records to `file://` ([`Recording`]). What
//! travels is a [`Message`]: JSON fields plus named [`Tensor`]s that live in
//! host memory, on a CUDA device or on a wgpu adapter, and values of your own
//! types through a [`Codec`]. Each channel's device map ([`ChannelConfig`],
//! [`ChannelSpec`], [`DeviceMap`]) says where a tensor sent from one
//! [`Device`] lands on the receiver; it is validated before anything moves.
//!
//! Everything an embedder needs is a top-level name of this crate, so
//! `use tensorferry::{…}` is the only import a program needs.
//!
//! # Publish and subscribe
//!
//! Two nodes over TCP; port 0 lets the system pick a free port, and the node
//! says which it got.
//!
//! ```
//! use std::time::Duration;
//! use tensorferry::{DType, Message, Node, Tensor};
//!
//! let camera = Node::builder().name("camera").listen("tcp://127.0.0.1:0").build()?;
//! let addr = camera.listen_addrs()[0].to_string(); // e.g. tcp://127.0.0.1:40123
//!
//! let viewer = Node::builder().name("viewer").build()?;
//! let frames = viewer.subscribe(&addr, "/camera")?;
//!
//! let publisher = camera.publisher("/camera");
//! publisher.wait_for_subscribers(1, Duration::from_secs(5))?;
//! let image = Tensor::from_slice(&[0.5f32; 12], &[2, 2, 3])?;
//! publisher.send(Message::new().field("frame", 1).tensor("image", image))?;
//!
//! let got = frames.recv_timeout(Duration::from_secs(5))?;
//! assert_eq!((got.channel.as_str(), got.seq), ("/camera", 0));
//! assert_eq!(got.message.get_field("frame"), Some(&serde_json::json!(1)));
//! let image = got.message.get("image").expect("the message carries `image`");
//! assert_eq!((image.dtype(), image.shape()), (DType::F32, &[2, 2, 3][..]));
//! assert_eq!(image.as_slice::<f32>()?, &[0.5f32; 12][..]);
//! # Ok::<(), tensorferry::Error>(())
//! ```
//!
//! # Request and reply
//!
//! A service declares what its requests must hold; a request that does not
//! match gets an error reply without reaching the handler.
//!
//! ```
//! use std::time::Duration;
//! use tensorferry::{DType, Error, Message, Node, Schema, Service, ServiceError, Tensor};
//!
//! let server = Node::builder().name("doubler").listen("tcp://127.0.0.1:0").build()?;
//! let addr = server.listen_addrs()[0].to_string();
//! let double = |request: Message| -> Result<Message, ServiceError> {
//!     let x = request.get("x").ok_or_else(|| ServiceError::new("bad_input", "no `x`"))?;
//!     let values = x.as_slice::<f32>().map_err(|e| ServiceError::new("bad_input", e.to_string()))?;
//!     let doubled: Vec<f32> = values.iter().map(|v| v * 2.0).collect();
//!     let y = Tensor::from_slice(&doubled, x.shape()).map_err(|e| ServiceError::new("internal", e.to_string()))?;
//!     Ok(Message::new().tensor("y", y))
//! };
//! let schema = Schema::new().tensor("x", DType::F32, "*")?;
//! server.serve("/double", Service::new(double).input(schema))?;
//!
//! let client = Node::builder().name("client").build()?;
//! let timeout = Duration::from_secs(5);
//! let request = Message::new().tensor("x", Tensor::from_slice(&[1.0f32, 2.5], &[2])?);
//! let reply = client.request(&addr, "/double", request, timeout)?;
//! let y = reply.get("y").expect("the reply carries `y`");
//! assert_eq!(y.as_slice::<f32>()?, &[2.0f32, 5.0][..]);
//!
//! // The wrong dtype: the schema answers, with a code a program can match on.
//! let wrong = Message::new().tensor("x", Tensor::from_slice(&[1u8, 2], &[2])?);
//! match client.request(&addr, "/double", wrong, timeout) {
//!     Err(Error::Remote { code, .. }) => assert_eq!(code, "bad_request"),
//!     other => panic!("expected an error reply, got {other:?}"),
//! }
//! # Ok::<(), tensorferry::Error>(())
//! ```
//!
//! # Device maps
//!
//! ```
//! use tensorferry::{ChannelConfig, Device, Inventory};
//!
//! let config = ChannelConfig::from_json_str(
//!     r#"{"channels": {"/camera": {"device_map": {"gpu:1": "cuda:0"}, "fallback": "cpu"}}}"#,
//! )?;
//! let here = Inventory::cpu_only();
//! let landed = config.channel("/camera")?.resolve(Device::cuda(1), &here)?;
//! assert_eq!(landed.target, Device::Cpu); // no cuda:0 here: the `cpu` fallback applies
//! # Ok::<(), tensorferry::Error>(())
//! ```
//!
//! # What lives where
//!
//! This crate re-exports the three crates that make up the engine, and their
//! main types at its top level:
//!
//! | module | what | top-level names |
//! |---|---|---|
//! | [`engine`] | nodes, channels, services, recording; tensors, messages, codecs; the wire format and transports | [`Node`], [`NodeBuilder`], [`Publisher`], [`Subscription`], [`Received`], [`Recording`], [`Loan`], [`Service`], [`Schema`], [`Dim`], [`Handler`], [`ServiceError`], [`Message`], [`Tensor`], [`HostBuffer`], [`Codec`], [`CodecRegistry`], [`Object`], [`NodeStats`], [`ChannelStats`], [`ALL_CHANNELS`], [`RecvFuture`], [`SendFuture`], [`SubscribersFuture`], [`RequestFuture`], [`Error`], [`Result`] |
//! | [`kernels`] | device runtimes (cpu, cuda, wgpu) and the kernels run where data lives (cast, checksum, pack) | [`DType`] |
//! | [`device_map`] | device names, device maps, channel configuration, validation and resolution | [`Device`], [`DeviceMap`], [`ChannelConfig`], [`ChannelSpec`], [`Fallback`], [`Inventory`], [`Pattern`] |
//!
//! Two names exist in more than one crate:
//!
//! - [`Error`] and [`Result`] are the engine's. Its `Error` wraps the other
//!   crates' errors (`Error::DeviceMap`, `Error::Kernels`), so `?` on a
//!   device-map or kernels call works in a function returning
//!   [`tensorferry::Result`](Result). The others stay reachable as
//!   [`device_map::Error`] and [`kernels::Error`].
//! - [`DType`] is the kernels crate's; the engine re-exports that same type,
//!   so there is only one.
//!
//! Lower layers — the wire format (`engine::wire`), delivery rules
//! (`engine::delivery`), device runtimes (`kernels::runtime`) — stay under
//! their modules.
//!
//! # Examples
//!
//! Each program in `examples/` runs with `cargo run --example NAME`, and the
//! test suite runs every one of them:
//!
//! - `pubsub`: two nodes over TCP, tensors of several dtypes and shapes, a burst's throughput;
//! - `service`: request/reply with input and output schemas, and the error replies;
//! - `device_landing`: tensors from the sender's `cpu` landing on `wgpu:0`,
//!   cast to bf16 on the wire and checksummed (or the `cpu` fallback where there is no adapter);
//! - `async_recv`: the async forms under tokio;
//! - `custom_codec`: a value of your own type in a message, through a [`Codec`];
//! - `device_map`: where each device's tensors land for a channel configuration file.

pub use tensorferry_device_map as device_map;
pub use tensorferry_engine as engine;
pub use tensorferry_engine::store;
pub use tensorferry_kernels as kernels;

pub use tensorferry_device_map::{
    ChannelConfig, ChannelSpec, Device, DeviceMap, Fallback, Inventory, Pattern,
};
pub use tensorferry_engine::{
    ChannelStats, Codec, CodecRegistry, DType, Dim, Error, Handler, HostBuffer, Loan,
    LostSubscriber, Message, Node, NodeBuilder, NodeStats, Object, Publisher, Received, Recording,
    RecvFuture, RequestFuture, Result, Schema, Secret, SendFuture, Service, ServiceError,
    SubscribersFuture, Subscription, Tensor, TlsConfig, ALL_CHANNELS,
};
