"""Type stubs of the extension module; see the docstrings for the details."""

import builtins
import os
from collections.abc import Awaitable, Callable, Generator, Iterator, Mapping
from typing import Any, Optional, Union, final

__version__: str
__all__ = [
    "DEFAULT_STORE_CHANNEL",
    "Message",
    "Node",
    "Proxy",
    "Fetch",
    "Publisher",
    "Recording",
    "Schema",
    "Store",
    "Subscription",
    "Tensor",
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

DEFAULT_STORE_CHANNEL: str
"""The channel a store is served on unless told otherwise: ``"/tensorferry/store"``."""

_JSON = Union[None, bool, int, float, str, list["_JSON"], tuple["_JSON", ...], dict[str, "_JSON"], "Proxy"]
"""A value a message's fields may hold (a :class:`Proxy` goes as its JSON form)."""

_TensorLike = Any
"""Anything with ``__dlpack__`` or the buffer protocol: a NumPy array, a
PyTorch CPU tensor, ``bytes``, ``memoryview``, or a :class:`Tensor`."""

_Reply = Union[None, dict[str, _JSON], tuple[Optional[dict[str, _JSON]], Mapping[str, _TensorLike]], "Message"]
"""What a service handler returns."""

@final
class Tensor:
    """A read-only tensor whose bytes are viewed, not copied, through DLPack
    (``np.from_dlpack``, ``torch.from_dlpack``) and the buffer protocol
    (``np.asarray``, ``memoryview``)."""

    @property
    def dtype(self) -> str:
        """``"f32"``, ``"bf16"``, ``"f8e4m3"``, …"""
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def strides(self) -> tuple[int, ...]:
        """In elements."""
    @property
    def ndim(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def device(self) -> str:
        """``"cpu"``, ``"cuda:0"``, ``"wgpu:0"``."""
    @property
    def is_contiguous(self) -> bool: ...
    @property
    def readonly(self) -> bool: ...
    @property
    def data_ptr(self) -> int:
        """Address of the first element (host tensors)."""
    def view(self, dtype: str) -> Tensor:
        """The same bytes as another dtype of the same size."""
    def tobytes(self) -> bytes:
        """The elements, packed row-major (a copy)."""
    def to_host(self) -> Tensor:
        """A host copy of a device tensor."""
    def __dlpack_device__(self) -> tuple[int, int]: ...
    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: Optional[tuple[int, int]] = None,
        dl_device: Optional[tuple[int, int]] = None,
        copy: Optional[bool] = None,
    ) -> Any: ...
    def __array__(self, dtype: Any = None, copy: Optional[bool] = None) -> Any:
        """Raises TypeError saying how to read a dtype NumPy lacks."""
    def __len__(self) -> int: ...

@final
class Message:
    """JSON ``fields`` and named tensors; ``msg["name"]`` is a :class:`Tensor`."""

    def __new__(
        cls,
        fields: Optional[Mapping[str, _JSON]] = None,
        tensors: Optional[Mapping[str, _TensorLike]] = None,
        **kwargs: _TensorLike,
    ) -> Message: ...
    @property
    def fields(self) -> dict[str, Any]: ...
    @property
    def tensors(self) -> dict[str, Tensor]: ...
    @property
    def channel(self) -> Optional[str]: ...
    @property
    def seq(self) -> Optional[int]: ...
    @property
    def sender(self) -> Optional[str]: ...
    @property
    def nbytes(self) -> int: ...
    def keys(self) -> list[str]: ...
    def __getitem__(self, key: str, /) -> Tensor: ...
    def __contains__(self, key: object, /) -> bool: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[str]: ...

@final
class Schema:
    """What a message must hold: ``Schema().tensor("x", "f32", "*,3").field("step")``."""

    def __new__(cls) -> Schema: ...
    def tensor(self, name: str, dtype: str, shape: str = "...") -> Schema: ...
    def field(self, name: str) -> Schema: ...
    def check(self, message: Message) -> None:
        """Raises ValueError naming the first mismatch."""

@final
class Publisher:
    """Publishes messages on one channel."""

    @property
    def channel(self) -> str: ...
    @property
    def subscribers(self) -> int: ...
    def send(
        self,
        fields: Optional[Mapping[str, _JSON]] = None,
        tensors: Optional[Mapping[str, _TensorLike]] = None,
        **kwargs: _TensorLike,
    ) -> None: ...
    def send_async(
        self,
        fields: Optional[Mapping[str, _JSON]] = None,
        tensors: Optional[Mapping[str, _TensorLike]] = None,
        **kwargs: _TensorLike,
    ) -> Awaitable[None]: ...
    def wait_for_subscribers(self, n: int = 1, timeout: Optional[float] = None) -> None: ...
    def wait_for_subscribers_async(self, n: int = 1) -> Awaitable[None]: ...
    def flush(self, timeout: Optional[float] = None) -> None: ...
    def flush_async(self) -> Awaitable[None]: ...
    def lost_subscribers(self) -> list[dict[str, Any]]: ...

@final
class Subscription:
    """Receives the messages of one channel; iterating yields them until the node closes."""

    @property
    def channel(self) -> str: ...
    @property
    def dropped(self) -> int: ...
    def recv(self, timeout: Optional[float] = None) -> Message: ...
    def try_recv(self) -> Optional[Message]: ...
    def recv_async(self) -> Awaitable[Message]: ...
    def close(self) -> None: ...
    def __iter__(self) -> Iterator[Message]: ...
    def __next__(self) -> Message: ...

@final
class Recording:
    """A recording to a ``file://`` address; a context manager."""

    def stop(self) -> int: ...
    def __enter__(self) -> Recording: ...
    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None: ...

@final
class Node:
    """Listens, connects, publishes, subscribes, serves and requests."""

    def __new__(
        cls,
        listen: Union[None, str, list[str]] = None,
        config: Union[None, str, os.PathLike[str], Mapping[str, Any]] = None,
        name: Optional[str] = None,
        *,
        listen_public: Union[None, str, list[str]] = None,
        secret_file: Union[None, str, os.PathLike[str]] = None,
        secret_env: Optional[str] = None,
        connect_timeout: Optional[float] = None,
        io_threads: Optional[int] = None,
        service_threads: Optional[int] = None,
        receive_budget_bytes: Optional[int] = None,
    ) -> Node: ...
    @property
    def name(self) -> str: ...
    @property
    def address(self) -> Optional[str]: ...
    @property
    def addresses(self) -> list[str]: ...
    @property
    def peers(self) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def channel_stats(self, channel: str) -> dict[str, int]: ...
    def connect(self, addr: str) -> None: ...
    def connect_async(self, addr: str) -> Awaitable[None]: ...
    def publisher(self, channel: str) -> Publisher: ...
    def subscribe(self, addr: str, channel: str) -> Subscription: ...
    def subscribe_async(self, addr: str, channel: str) -> Awaitable[Subscription]: ...
    def subscriber(self, channel: str = "*") -> Subscription: ...
    def record(self, addr: str, channel: str = "*") -> Recording: ...
    def serve(
        self,
        channel: str,
        handler: Callable[[Message], _Reply],
        *,
        input: Optional[Schema] = None,
        output: Optional[Schema] = None,
    ) -> None: ...
    def request(
        self,
        addr: str,
        channel: str,
        /,
        fields: Optional[Mapping[str, _JSON]] = None,
        tensors: Optional[Mapping[str, _TensorLike]] = None,
        *,
        timeout: Optional[float] = None,
        **kwargs: _TensorLike,
    ) -> Message: ...
    def request_async(
        self,
        addr: str,
        channel: str,
        /,
        fields: Optional[Mapping[str, _JSON]] = None,
        tensors: Optional[Mapping[str, _TensorLike]] = None,
        **kwargs: _TensorLike,
    ) -> Awaitable[Message]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Node: ...
    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None: ...

def tensor(obj: _TensorLike, dtype: Optional[str] = None) -> Tensor:
    """A :class:`Tensor` viewing ``obj``'s memory; ``dtype`` reinterprets it (same size)."""

def devices() -> dict[str, Any]:
    """What this host has: cpu, cuda, wgpu and the inventory."""

def check_map(path: Union[str, os.PathLike[str]], devices: Optional[str] = None) -> dict[str, Any]:
    """Every channel's resolved device map, or every error with its place."""

@final
class Store:
    """Messages under keys, written once: in this process's memory, in a
    directory, or served by a node. ``get`` views what is stored without a copy;
    ``proxy`` hands out a small :class:`Proxy` to send in place of the data."""

    @staticmethod
    def memory(name: Optional[str] = None) -> Store:
        """The memory store ``name`` of this process (made when absent), or a new one."""
    @staticmethod
    def dir(path: Union[str, os.PathLike[str]]) -> Store:
        """A store of one file per key in ``path`` (made when absent)."""
    @staticmethod
    def remote(node: Node, addr: str, channel: str = "/tensorferry/store", timeout: float = 60.0) -> Store:
        """The store a node serves at ``addr``, reached through ``node``."""
    @staticmethod
    def open(location: str, node: Optional[Node] = None) -> Store:
        """The store at ``"dir:PATH"``, ``"memory:NAME"`` or ``"tcp://HOST:PORT[#CHANNEL]"``."""
    @property
    def location(self) -> str:
        """Where the store is, as its proxies name it."""
    def put(
        self,
        fields: Any = None,
        tensors: Optional[Mapping[str, _TensorLike]] = None,
        *,
        key: Optional[str] = None,
        overwrite: bool = False,
        serializer: Optional[Callable[[Any], Union[bytes, bytearray]]] = None,
        **kwargs: _TensorLike,
    ) -> str:
        """Stores fields and tensors (or ``serializer(fields)``); returns the key."""
    def put_proxy(
        self,
        fields: Any = None,
        tensors: Optional[Mapping[str, _TensorLike]] = None,
        *,
        serializer: Optional[Callable[[Any], Union[bytes, bytearray]]] = None,
        **kwargs: _TensorLike,
    ) -> Proxy:
        """Stores under a new key and returns a proxy of it."""
    def get(self, key: str, deserializer: Optional[Callable[[bytes], Any]] = None) -> Any:
        """The :class:`Message` under ``key``, or ``deserializer(bytes)`` of a serialized value."""
    def exists(self, key: str) -> bool: ...
    def evict(self, key: str) -> bool:
        """Removes ``key``; ``True`` when it held something."""
    def list(self) -> builtins.list[dict[str, Any]]:
        """Every entry, sorted by key: ``{"key": str, "bytes": int}``."""
    def manifest(self, key: str) -> dict[str, Any]:
        """``{"key", "tensors": [{"name", "dtype", "shape", "bytes", "checksum"}], "frame_bytes"}``."""
    def proxy(self, key: str) -> Proxy: ...
    def serve(self, node: Node, channel: str = "/tensorferry/store") -> None:
        """Serves this store on ``node``'s ``channel``."""
    def served_at(self, addr: str, channel: str = "/tensorferry/store") -> Store:
        """This store, making proxies that name the node serving it at ``addr``."""

@final
class Proxy:
    """A reference to a stored message (store, key, and each tensor's dtype,
    shape, bytes and checksum) that fetches on first use or ahead of it."""

    @staticmethod
    def from_json(value: Union[str, Mapping[str, Any]]) -> Proxy:
        """A proxy from :meth:`to_json`'s dict, or its JSON text."""
    def to_json(self) -> dict[str, Any]: ...
    @property
    def key(self) -> str: ...
    @property
    def location(self) -> str: ...
    @property
    def tensors(self) -> list[dict[str, Any]]:
        """``[{"name", "dtype", "shape", "bytes", "checksum"}]``, in message order."""
    @property
    def nbytes(self) -> int: ...
    def is_resolved(self) -> bool: ...
    def resolve(self, timeout: Optional[float] = None, deserializer: Optional[Callable[[bytes], Any]] = None) -> Any:
        """The :class:`Message` (or ``deserializer(bytes)``), fetched once and kept."""
    def resolve_async(self) -> Fetch:
        """Starts fetching in the background; returns at once (await the result for the message)."""
    def resolve_to(self, node: Node, channel: str, timeout: Optional[float] = None) -> Message:
        """The message landed where ``node``'s map for ``channel`` says."""
    def tensor(self, timeout: Optional[float] = None) -> Tensor:
        """The one tensor of a one-tensor proxy."""
    def verify(self, timeout: Optional[float] = None) -> Message:
        """Resolves and checks every byte against the proxy's checksums."""
    def set_node(self, node: Node) -> None:
        """Resolves a served store's proxy through ``node``."""

@final
class Fetch:
    """A fetch :meth:`Proxy.resolve_async` started; ``await`` it for the message."""
    def done(self) -> bool: ...
    def result(self, timeout: Optional[float] = None) -> Any: ...
    def __await__(self) -> Generator[Any, None, Message]: ...

def set_proxy_cache_limit(bytes: int) -> None:
    """Most bytes the per-process cache of resolved proxies holds (0: no caching)."""

def proxy_cache_stats() -> dict[str, int]:
    """``hits``, ``misses``, ``evictions``, ``entries``, ``bytes`` and ``limit``."""

def clear_proxy_cache() -> None:
    """Drops every entry of the proxy cache (the counters stay)."""

def set_store_client_node(node: Node) -> None:
    """The node served stores are reached through when a proxy has none."""

def is_proxy(value: Any) -> bool:
    """Whether ``value`` is a :class:`Proxy` or its JSON dict."""
