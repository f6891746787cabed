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

Every waiting call releases the GIL, answers Ctrl-C with
``KeyboardInterrupt``, and has an asyncio twin (``recv_async``,
``send_async``, ``wait_for_subscribers_async``, ``request_async``).
Errors are subclasses of :class:`Error` carrying the engine's message.
"""

from ._errors import (
    ClosedError,
    ConfigError,
    DeviceError,
    Error,
    FrameError,
    InvalidArgument,
    IoError,
    PeerLost,
    ProtocolError,
    ServiceError,
    TimeoutError,
)
from ._native import (
    Message,
    Node,
    Publisher,
    Recording,
    Schema,
    Subscription,
    Tensor,
    __version__,
    check_map,
    devices,
    tensor,
)

__all__ = [
    "ClosedError",
    "ConfigError",
    "DeviceError",
    "Error",
    "FrameError",
    "InvalidArgument",
    "IoError",
    "Message",
    "Node",
    "PeerLost",
    "ProtocolError",
    "Publisher",
    "Recording",
    "Schema",
    "ServiceError",
    "Subscription",
    "Tensor",
    "TimeoutError",
    "__version__",
    "check_map",
    "devices",
    "tensor",
]
