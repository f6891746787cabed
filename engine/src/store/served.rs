//! A store served by a node over request/reply, and the client that
//! reaches one.
//!
//! A request names its operation in the field `op` (`put`, `get`,
//! `manifest`, `exists`, `evict`, `list`) and its key in `key`; a `put`
//! carries the message's tensors and objects, its fields under `fields`.
//! A `get` replies with the stored tensors and objects, the stored fields
//! under `fields` and the entry's manifest under `manifest`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::backend::Backend;
use super::{check_key, Entry, Location, Manifest, Overwrite};
use crate::error::{Error, Result};
use crate::message::Message;
use crate::node::Node;
use crate::service::{Service, ServiceError};

/// The channel a store is served on unless told otherwise.
pub const DEFAULT_CHANNEL: &str = "/tensorferry/store";

/// How long a client waits for each call by default.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

const NOT_STORED: &str = "not_stored";
const ALREADY_STORED: &str = "already_stored";

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn service_error(e: Error) -> ServiceError {
    match e {
        Error::NotStored { .. } => ServiceError::new(NOT_STORED, e.to_string()),
        Error::AlreadyStored { .. } => ServiceError::new(ALREADY_STORED, e.to_string()),
        Error::Invalid(_) => ServiceError::new("bad_request", e.to_string()),
        _ => ServiceError::new("store_error", e.to_string()),
    }
}

/// Answers one request against `backend`.
fn answer(backend: &dyn Backend, request: Message) -> std::result::Result<Message, ServiceError> {
    let text = |name: &str| {
        request
            .get_field(name)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let op = text("op")
        .ok_or_else(|| ServiceError::new("bad_request", "a store request names its `op`"))?;
    let key = || -> std::result::Result<String, ServiceError> {
        let key = text("key")
            .ok_or_else(|| ServiceError::new("bad_request", format!("`{op}` needs a `key`")))?;
        check_key(&key).map_err(service_error)?;
        Ok(key)
    };
    let reply = match op.as_str() {
        "put" => {
            let key = key()?;
            let overwrite = if request.get_field("overwrite").and_then(Value::as_bool) == Some(true)
            {
                Overwrite::Replace
            } else {
                Overwrite::Refuse
            };
            let fields = match request.get_field("fields") {
                Some(Value::Object(m)) => m.clone(),
                _ => Map::new(),
            };
            let manifest = backend
                .put(&key, &request.with_fields(fields), overwrite)
                .map_err(service_error)?;
            Message::new().field("manifest", to_json(&manifest))
        }
        "get" => {
            let (message, manifest) = backend.get(&key()?).map_err(service_error)?;
            let mut fields = Map::new();
            fields.insert("manifest".into(), to_json(&manifest));
            fields.insert("fields".into(), Value::Object(message.fields().clone()));
            message.with_fields(fields)
        }
        "manifest" => Message::new().field(
            "manifest",
            to_json(&backend.manifest(&key()?).map_err(service_error)?),
        ),
        "exists" => {
            Message::new().field("present", backend.exists(&key()?).map_err(service_error)?)
        }
        "evict" => Message::new().field("present", backend.evict(&key()?).map_err(service_error)?),
        "list" => Message::new().field("entries", to_json(&backend.list().map_err(service_error)?)),
        other => {
            return Err(ServiceError::new(
                "bad_request",
                format!(
                "unknown store operation `{other}`; one of put, get, manifest, exists, evict, list"
            ),
            ))
        }
    };
    Ok(reply)
}

/// Registers `backend` as a service on `node`'s `channel`.
pub(crate) fn serve(backend: Arc<dyn Backend>, node: &Node, channel: &str) -> Result<()> {
    // A reply cast for the wire would reach a resolver with other bytes
    // than the proxy's checksums describe.
    if !node.channel_spec(channel).wire_dtype.is_empty() {
        return Err(Error::Invalid(format!(
            "the channel `{channel}` casts tensors on the wire (wire_dtype); a store must send what it holds: serve it on a channel without wire_dtype"
        )));
    }
    node.serve(
        channel,
        Service::new(move |request: Message| answer(backend.as_ref(), request)),
    )
}

/// A store served by another node, reached through this process's `node`.
pub(crate) struct RemoteBackend {
    node: Node,
    addr: String,
    channel: String,
    timeout: Duration,
}

impl RemoteBackend {
    pub(crate) fn new(node: Node, addr: &str, channel: &str, timeout: Duration) -> RemoteBackend {
        RemoteBackend {
            node,
            addr: addr.to_string(),
            channel: channel.to_string(),
            timeout,
        }
    }

    pub(crate) fn with_timeout(&self, timeout: Duration) -> RemoteBackend {
        RemoteBackend::new(self.node.clone(), &self.addr, &self.channel, timeout)
    }

    /// One request; the store's own errors come back as the engine's.
    fn call(&self, request: Message, key: Option<&str>) -> Result<Message> {
        let store = self.location().to_string();
        self.node
            .request(&self.addr, &self.channel, request, self.timeout)
            .map_err(|e| match e {
                Error::Remote { ref code, .. } if code == NOT_STORED => Error::NotStored {
                    store,
                    key: key.unwrap_or_default().to_string(),
                },
                Error::Remote { ref code, .. } if code == ALREADY_STORED => Error::AlreadyStored {
                    store,
                    key: key.unwrap_or_default().to_string(),
                },
                Error::Remote { ref code, .. } if code == "no_service" => Error::StoreUnreachable {
                    source: Box::new(e),
                    store: format!("{store} (no store is served on that channel)"),
                },
                e @ (Error::Remote { .. } | Error::Invalid(_)) => e,
                e => Error::StoreUnreachable {
                    store,
                    source: Box::new(e),
                },
            })
    }

    fn keyed(op: &str, key: &str) -> Message {
        Message::new().field("op", op).field("key", key)
    }

    fn manifest_of(&self, reply: &Message) -> Result<Manifest> {
        reply
            .get_field("manifest")
            .cloned()
            .and_then(|v| serde_json::from_value(v).ok())
            .ok_or_else(|| self.bad_reply("no manifest"))
    }

    fn bad_reply(&self, what: &str) -> Error {
        Error::Invalid(format!(
            "store {}: a reply with {what}; is a store served there?",
            self.location()
        ))
    }
}

impl Backend for RemoteBackend {
    fn location(&self) -> Location {
        Location::Served {
            addr: self.addr.clone(),
            channel: self.channel.clone(),
        }
    }

    fn put(&self, key: &str, message: &Message, overwrite: Overwrite) -> Result<Manifest> {
        message.check_names()?;
        let fields = json!({
            "op": "put",
            "key": key,
            "overwrite": overwrite == Overwrite::Replace,
            "fields": Value::Object(message.fields().clone()),
        });
        let Value::Object(fields) = fields else {
            unreachable!("json! of an object literal is an object")
        };
        let reply = self.call(message.clone().with_fields(fields), Some(key))?;
        self.manifest_of(&reply)
    }

    fn get(&self, key: &str) -> Result<(Message, Manifest)> {
        let reply = self.call(Self::keyed("get", key), Some(key))?;
        let claimed = self.manifest_of(&reply)?;
        let fields = match reply.get_field("fields") {
            Some(Value::Object(m)) => m.clone(),
            _ => return Err(self.bad_reply("no fields")),
        };
        let message = reply.with_fields(fields);
        // What arrived, not only what the store says it sent.
        let manifest = Manifest::of_reply(&message, &claimed)?;
        Ok((message, manifest))
    }

    fn manifest(&self, key: &str) -> Result<Manifest> {
        let reply = self.call(Self::keyed("manifest", key), Some(key))?;
        self.manifest_of(&reply)
    }

    fn exists(&self, key: &str) -> Result<bool> {
        let reply = self.call(Self::keyed("exists", key), Some(key))?;
        reply
            .get_field("present")
            .and_then(Value::as_bool)
            .ok_or_else(|| self.bad_reply("no `present`"))
    }

    fn evict(&self, key: &str) -> Result<bool> {
        let reply = self.call(Self::keyed("evict", key), Some(key))?;
        reply
            .get_field("present")
            .and_then(Value::as_bool)
            .ok_or_else(|| self.bad_reply("no `present`"))
    }

    fn list(&self) -> Result<Vec<Entry>> {
        let reply = self.call(Message::new().field("op", "list"), None)?;
        reply
            .get_field("entries")
            .cloned()
            .and_then(|v| serde_json::from_value(v).ok())
            .ok_or_else(|| self.bad_reply("no entries"))
    }

    fn remote(&self) -> Option<&RemoteBackend> {
        Some(self)
    }
}
