"""The exceptions tensorferry raises.

Every error of the engine arrives as a subclass of :class:`Error`, carrying
the engine's message (what was wrong, where, and how to fix it). Where a
built-in exception means the same thing, the class derives from it too, so
``except TimeoutError`` and ``except ValueError`` keep working.
"""

import builtins


class Error(Exception):
    """Base class of every tensorferry error."""


class ConfigError(Error, ValueError):
    """A channel configuration (file or dict) that is not valid.

    The message lists every error, each with its place in the file (the
    channel, the key path, and for malformed JSON the line and column).
    """


class InvalidArgument(Error, ValueError):
    """A value given to a call that is not valid: an address, a name, an option."""


class TimeoutError(Error, builtins.TimeoutError):
    """Nothing arrived, or nothing had room, within the time allowed."""


class PeerLost(Error, ConnectionError):
    """The connection a subscription or a request depended on was lost.

    ``peer`` is the peer's address.
    """

    peer: "str | None" = None


class ProtocolError(PeerLost):
    """A peer broke the protocol (a frame that cannot be read, lying lengths):
    its connection was closed."""


class ServiceError(Error):
    """An error reply from a service, or one a handler raises to choose its code.

    Raise ``ServiceError(code, message)`` in a handler to answer with that
    code; any other exception a handler raises answers with its class name
    as the code and ``str(exception)`` as the message. A requester receives
    the reply as this exception, with ``code``, ``message`` and ``channel``.
    """

    def __init__(self, code: str, message: str = "", channel: "str | None" = None):
        super().__init__(
            f"service `{channel}` replied with error `{code}`: {message}"
            if channel is not None
            else f"{code}: {message}"
        )
        self.code = code
        self.message = message
        self.channel = channel


class ClosedError(Error):
    """The node was shut down, or a replayed recording has no more messages."""


class FrameError(Error, ValueError):
    """A frame or a recording that is malformed: truncated, over a limit,
    lying about its lengths, or of an unknown format version."""


class DeviceError(Error):
    """A device that is missing, or a device runtime (CUDA, wgpu) that failed."""


class IoError(Error, OSError):
    """An operating-system error, with what was being done."""


class StoreError(Error):
    """A store or a proxy failed: the base of the four errors below.

    ``store`` names the store where the error knows it (``dir:PATH``,
    ``memory:NAME`` or a node's address), ``key`` the key.
    """

    store: "str | None" = None
    key: "str | None" = None


class NotStored(StoreError, KeyError):
    """A store holds nothing under the key: it was never put there, or was
    evicted. Also a :class:`KeyError`."""

    def __str__(self) -> str:
        # KeyError quotes its message; this one is a sentence.
        return Exception.__str__(self)


class AlreadyStored(StoreError):
    """A put found its key taken: a key is written once, unless the put
    says ``overwrite=True``."""


class ProxyMismatch(StoreError):
    """What a store holds under a proxy's key is not what the proxy
    describes (the key was put again with other data): never a wrong tensor."""


class StoreUnreachable(StoreError, ConnectionError):
    """A served store could not be reached, or refused this node (a secret
    that does not match). Also a :class:`ConnectionError`."""
