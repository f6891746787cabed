"""tensorferry: named tensors over device-mapped channels between threads,
processes and hosts.

The main type is :class:`Node`: it listens and connects over ``tcp://``,
``shm://`` and ``inproc://``, and on named channels it publishes
(:class:`Publisher`), subscribes (:class:`Subscription`, each message a
:class:`Message`), serves requests (:meth:`Node.serve`, checked against a
:class:`Schema`) and records to ``file://`` (:class:`Recording`). Tensors
go in as anything with ``__dlpack__`` or the buffer protocol (NumPy,
PyTorch) and come out as :class:`Tensor`, which exports both — without
copying their bytes either way.

Example::

    import numpy as np, tensorferry as tf

    node = tf.Node(listen="tcp://127.0.0.1:0")
    pub = node.publisher("/params")
    sub = tf.Node().subscribe(node.address, "/params")
    pub.wait_for_subscribers(1, timeout=5)
    pub.send({"step": 3}, weights=np.ones((3, 4), np.float32))
    msg = sub.recv(timeout=5.0)        # msg.fields, msg.channel, msg.seq
    w = np.from_dlpack(msg["weights"])  # a read-only view of the received bytes

A :class:`Store` keeps messages under keys (in memory, in a directory, or
served by a node); a :class:`Proxy` of a stored message travels in its
place, as a field, and fetches where it is used (:meth:`Proxy.resolve`,
:meth:`Proxy.resolve_async`), through a per-process cache bounded in bytes
(:func:`set_proxy_cache_limit`).

Every waiting call releases the GIL, answers Ctrl-C with
``KeyboardInterrupt``, and has an asyncio twin (``recv_async``,
``send_async``, ``wait_for_subscribers_async``, ``request_async``).
Errors are subclasses of :class:`Error` carrying the engine's message.
"""

from ._errors import (
    AlreadyStored,
    ClosedError,
    ConfigError,
    DeviceError,
    Error,
    FrameError,
    InvalidArgument,
    IoError,
    NotStored,
    PeerLost,
    ProtocolError,
    ProxyMismatch,
    ServiceError,
    StoreError,
    StoreUnreachable,
    TimeoutError,
)
from ._native import (
    DEFAULT_STORE_CHANNEL,
    Message,
    Node,
    Proxy,
    Fetch,
    Publisher,
    Recording,
    Schema,
    Store,
    Subscription,
    Tensor,
    __version__,
    check_map,
    clear_proxy_cache,
    devices,
    is_proxy,
    proxy_cache_stats,
    set_proxy_cache_limit,
    set_store_client_node,
    tensor,
)

__all__ = [
    "AlreadyStored",
    "ClosedError",
    "ConfigError",
    "DEFAULT_STORE_CHANNEL",
    "DeviceError",
    "Error",
    "FrameError",
    "InvalidArgument",
    "IoError",
    "Message",
    "Node",
    "NotStored",
    "PeerLost",
    "ProtocolError",
    "Proxy",
    "Fetch",
    "ProxyMismatch",
    "Publisher",
    "Recording",
    "Schema",
    "ServiceError",
    "Store",
    "StoreError",
    "StoreUnreachable",
    "Subscription",
    "Tensor",
    "TimeoutError",
    "__version__",
    "check_map",
    "clear_proxy_cache",
    "devices",
    "is_proxy",
    "proxy_cache_stats",
    "set_proxy_cache_limit",
    "set_store_client_node",
    "tensor",
]
