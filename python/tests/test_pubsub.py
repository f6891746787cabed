"""Publish/subscribe across processes, dtypes, strided inputs, zero-copy
views and their lifetimes."""

import gc
import hashlib
import time
import weakref

import numpy as np
import pytest

import tensorferry as tf
from conftest import optional, unique

ml_dtypes = optional("ml_dtypes")
torch = optional("torch")

# Every dtype NumPy has that tensorferry carries.
NUMPY_DTYPES = {
    "bool": "bool",
    "int8": "i8",
    "int16": "i16",
    "int32": "i32",
    "int64": "i64",
    "uint8": "u8",
    "uint16": "u16",
    "uint32": "u32",
    "uint64": "u64",
    "float16": "f16",
    "float32": "f32",
    "float64": "f64",
}


def sample(dtype: str, shape=(3, 5), seed=0) -> np.ndarray:
    """Values of `dtype` that cover its range (bit patterns for floats too)."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    n = int(np.prod(shape))
    if dt == np.bool_:
        return rng.integers(0, 2, n).astype(bool).reshape(shape)
    raw = rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


RECEIVER = """
node = tf.Node(listen=sys.argv[1])
sub = node.subscriber("/params")
emit(address=node.address)
for _ in range(int(sys.argv[2])):
    msg = sub.recv(timeout=30)
    out = {}
    for name in msg:
        t = msg[name]
        a = np.asarray(t) if t.dtype not in ("bf16", "f8e4m3", "f8e5m2") else np.asarray(t.view("u16" if t.dtype == "bf16" else "u8"))
        v = np.from_dlpack(t) if t.dtype not in ("bf16", "f8e4m3", "f8e5m2") else a
        out[name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "sha": __import__("hashlib").sha256(np.ascontiguousarray(a).tobytes()).hexdigest(),
            "same": a.tobytes() == v.tobytes(),
            "zero_copy": a.__array_interface__["data"][0] == t.data_ptr == v.__array_interface__["data"][0],
            "readonly": not a.flags.writeable and not v.flags.writeable,
        }
    emit(channel=msg.channel, seq=msg.seq, fields=msg.fields, tensors=out)
"""


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_two_processes_carry_every_numpy_dtype(peer, transport):
    listen = "tcp://127.0.0.1:0" if transport == "tcp" else f"shm://{unique('tfpy')}"
    rx = peer(RECEIVER, listen, "2")
    address = rx.line()["address"]
    node = tf.Node()
    pub = node.publisher("/params")
    node.connect(address)
    pub.wait_for_subscribers(1, timeout=30)

    arrays = {name: sample(name, seed=i) for i, name in enumerate(NUMPY_DTYPES)}
    pub.send({"step": 3, "note": "all dtypes", "nested": {"lr": 0.5, "ids": [1, 2]}}, tensors=arrays)
    big = np.arange(1 << 20, dtype=np.float32).reshape(1024, 1024)
    pub.send({"step": 4}, weights=big)

    got = rx.line()
    assert got["channel"] == "/params" and got["seq"] == 0
    assert got["fields"] == {"step": 3, "note": "all dtypes", "nested": {"lr": 0.5, "ids": [1, 2]}}
    for name, a in arrays.items():
        t = got["tensors"][name]
        assert t["dtype"] == NUMPY_DTYPES[name]
        assert t["shape"] == list(a.shape)
        assert t["sha"] == digest(a), name
        assert t["same"] and t["zero_copy"] and t["readonly"], (name, t)
    got = rx.line()
    assert got["seq"] == 1 and got["fields"] == {"step": 4}
    assert got["tensors"]["weights"]["sha"] == digest(big)
    assert got["tensors"]["weights"]["zero_copy"]
    rx.wait()


def test_strided_inputs_travel_packed(peer):
    rx = peer(RECEIVER, "tcp://127.0.0.1:0", "1")
    address = rx.line()["address"]
    base = np.arange(6 * 8, dtype=np.int32).reshape(6, 8)
    views = {
        "columns": base[:, ::2],
        "transposed": base.T,
        "reversed": base[::-1, ::-3],
        "broadcast": np.broadcast_to(np.arange(4, dtype=np.float64), (3, 4)),
        "fortran": np.asfortranarray(base.astype(np.float32)),
        "scalar": np.array(7, dtype=np.int16),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    assert not views["columns"].flags.c_contiguous
    node = tf.Node()
    pub = node.publisher("/params")
    node.connect(address)
    pub.wait_for_subscribers(1, timeout=30)
    pub.send(None, tensors=views)
    got = rx.line()["tensors"]
    for name, v in views.items():
        assert got[name]["shape"] == list(v.shape), name
        assert got[name]["sha"] == digest(v), name
    rx.wait()


def test_local_subscriber_sees_the_senders_memory():
    node = tf.Node()
    sub = node.subscriber("/x")
    pub = node.publisher("/x")
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    pub.send({"k": 1}, x=a, col=a[:, 1])
    msg = sub.recv(timeout=5)
    assert msg["x"].data_ptr == a.ctypes.data
    view = np.from_dlpack(msg["x"])
    assert view.ctypes.data == a.ctypes.data
    assert not view.flags.writeable
    # A strided view moves by reference too, and exports its strides.
    col = np.from_dlpack(msg["col"])
    assert col.ctypes.data == a[:, 1].ctypes.data
    np.testing.assert_array_equal(col, a[:, 1])
    assert msg["col"].strides == (4,) and not msg["col"].is_contiguous


def test_a_sent_array_lives_until_its_last_view_is_gone():
    node = tf.Node()
    sub = node.subscriber("/x")
    pub = node.publisher("/x")
    a = np.full((256, 256), 3.0)
    alive = weakref.ref(a)
    pub.send(x=a)
    del a
    gc.collect()
    assert alive() is not None, "the message holds the array"
    msg = sub.recv(timeout=5)
    view = np.from_dlpack(msg["x"])
    del msg, sub
    gc.collect()
    assert alive() is not None, "the view holds the array"
    assert view[255, 255] == 3.0
    del view
    deadline = time.monotonic() + 5
    while alive() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert alive() is None, "released once nothing views it"


def test_a_view_outlives_its_message_subscription_and_node(peer):
    rx_node = tf.Node(listen="tcp://127.0.0.1:0")
    sub = rx_node.subscriber("/x")
    tx = tf.Node()
    pub = tx.publisher("/x")
    tx.connect(rx_node.address)
    pub.wait_for_subscribers(1, timeout=10)
    data = np.random.default_rng(1).standard_normal((512, 64))
    pub.send(x=data)
    msg = sub.recv(timeout=10)
    numpy_view = np.from_dlpack(msg["x"])
    buffer_view = memoryview(msg["x"])
    tensor = msg["x"]
    del msg, sub
    rx_node.close()
    del rx_node, tx, pub
    gc.collect()
    np.testing.assert_array_equal(numpy_view, data)
    np.testing.assert_array_equal(np.asarray(buffer_view), data)
    np.testing.assert_array_equal(np.asarray(tensor), data)


def test_received_views_are_read_only():
    node = tf.Node()
    sub = node.subscriber("/x")
    node.publisher("/x").send(x=np.zeros(4, np.int64))
    t = sub.recv(timeout=5)["x"]
    m = memoryview(t)
    assert m.readonly and m.format == "q" and m.shape == (4,)
    with pytest.raises(TypeError):
        m[0] = 1
    with pytest.raises(ValueError):
        np.asarray(t)[0] = 1
    with pytest.raises(ValueError):
        np.from_dlpack(t)[0] = 1


def test_forwarding_a_received_tensor_sends_its_bytes():
    node = tf.Node()
    first = node.subscriber("/a")
    second = node.subscriber("/b")
    a = np.arange(10, dtype=np.uint16)
    node.publisher("/a").send(x=a)
    t = first.recv(timeout=5)["x"]
    node.publisher("/b").send(y=t)
    got = second.recv(timeout=5)["y"]
    assert got.data_ptr == a.ctypes.data
    np.testing.assert_array_equal(np.asarray(got), a)


@pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes is not installed")
def test_ml_dtypes_bf16_and_fp8_arrays_travel(peer):
    node = tf.Node(listen="tcp://127.0.0.1:0")
    sub = node.subscriber("/x")
    tx = tf.Node()
    pub = tx.publisher("/x")
    tx.connect(node.address)
    pub.wait_for_subscribers(1, timeout=10)
    arrays = {
        "bf16": np.linspace(-2, 2, 12).astype(ml_dtypes.bfloat16).reshape(3, 4),
        "e4m3": np.linspace(-2, 2, 8).astype(ml_dtypes.float8_e4m3fn),
        "e5m2": np.linspace(-2, 2, 8).astype(ml_dtypes.float8_e5m2),
    }
    pub.send(tensors=arrays)
    msg = sub.recv(timeout=10)
    assert [msg[n].dtype for n in arrays] == ["bf16", "f8e4m3", "f8e5m2"]
    for name, a in arrays.items():
        bits = np.asarray(msg[name].view("u16" if name == "bf16" else "u8"))
        np.testing.assert_array_equal(bits.view(a.dtype), a)


@pytest.mark.skipif(torch is None, reason="torch is not installed")
def test_torch_bf16_round_trips_through_dlpack():
    node = tf.Node()
    sub = node.subscriber("/x")
    x = torch.linspace(-3, 3, 24, dtype=torch.bfloat16).reshape(4, 6)
    node.publisher("/x").send(x=x, t=x.t())
    msg = sub.recv(timeout=5)
    assert msg["x"].dtype == "bf16"
    y = torch.from_dlpack(msg["x"])
    assert y.dtype == torch.bfloat16 and torch.equal(y, x)
    assert torch.equal(torch.from_dlpack(msg["t"]), x.t())


def test_a_read_only_array_is_sent_and_stays_read_only():
    node = tf.Node()
    sub = node.subscriber("/x")
    a = np.arange(6, dtype=np.int32)
    a.flags.writeable = False
    node.publisher("/x").send(x=a, m=memoryview(b"abc"))
    msg = sub.recv(timeout=5)
    assert msg["x"].data_ptr == a.ctypes.data
    assert not a.flags.writeable
    assert bytes(msg["m"].tobytes()) == b"abc" and msg["m"].dtype == "u8"


@pytest.mark.skipif(torch is None, reason="torch is not installed")
def test_torch_cpu_tensors_are_sent_without_a_copy():
    node = tf.Node()
    sub = node.subscriber("/x")
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    node.publisher("/x").send(x=x)
    assert sub.recv(timeout=5)["x"].data_ptr == x.data_ptr()


def cuda_or_skip():
    import os

    if torch is None or not torch.cuda.is_available():
        if os.environ.get("TENSORFERRY_REQUIRE_CUDA") == "1":
            pytest.fail("TENSORFERRY_REQUIRE_CUDA=1 but torch with CUDA is not available")
        pytest.skip("SKIP: no torch with CUDA")


@pytest.mark.parametrize("transport", ["tcp", "shm"])
@pytest.mark.parametrize("lands_on", ["cuda:0", "cpu"])
def test_cuda_tensors_are_sent_from_device_memory(transport, lands_on):
    cuda_or_skip()
    listen = "tcp://127.0.0.1:0" if transport == "tcp" else f"shm://{unique('tfcuda')}"
    config = {"channels": {"/x": {"device_map": {"default": lands_on}}}}
    rx = tf.Node(listen=listen, config=config)
    sub = rx.subscriber("/x")
    tx = tf.Node()
    pub = tx.publisher("/x")
    tx.connect(rx.address)
    pub.wait_for_subscribers(1, timeout=10)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        # Written on a side stream: the send must wait for these writes.
        x = torch.randn(64, 33, device="cuda")
        bf = (torch.randn(17, device="cuda") * 3).to(torch.bfloat16)
    want = {"x": x.cpu(), "xt": x.t().cpu(), "bf": bf.cpu()}
    pub.send(x=x, xt=x.t(), bf=bf)
    # The sender holds the device memory until its bytes are written.
    del x, bf
    msg = sub.recv(timeout=30)
    for name, expected in want.items():
        t = msg[name]
        assert t.device == lands_on
        y = torch.from_dlpack(t)
        assert y.device == torch.device(lands_on)
        assert y.data_ptr() == t.data_ptr  # viewed, not copied
        assert torch.equal(y.cpu(), expected)


def test_a_tensor_received_on_cuda_outlives_its_message_as_a_torch_tensor():
    cuda_or_skip()
    config = {"channels": {"/x": {"device_map": {"default": "cuda:0"}}}}
    rx = tf.Node(listen="tcp://127.0.0.1:0", config=config)
    sub = rx.subscriber("/x")
    tx = tf.Node()
    pub = tx.publisher("/x")
    tx.connect(rx.address)
    pub.wait_for_subscribers(1, timeout=10)
    pub.send(x=np.arange(1000, dtype=np.float32))
    y = torch.from_dlpack(sub.recv(timeout=30)["x"])
    del sub, rx
    gc.collect()
    assert torch.equal(y.cpu(), torch.arange(1000, dtype=torch.float32))


SHM_SENDER = """
import time
node = tf.Node(listen=sys.argv[1])
pub = node.publisher("/x")
emit(address=node.address)
for round in range(2):
    pub.wait_for_subscribers(1, timeout=30)
    for i in range(8):
        pub.send({"i": i}, x=np.full((256, 256), 100 * round + i, np.float32))
    pub.flush(timeout=30)
    emit(sent=round)
    # The next round starts once this round's subscriber is gone.
    while node.peers:
        time.sleep(0.01)
    emit(idle=round)
"""


def test_a_view_over_shared_memory_outlives_its_node_while_the_sender_goes_on(peer):
    tx = peer(SHM_SENDER, f"shm://{unique('tfpy')}")
    address = tx.line()["address"]
    first = tf.Node()
    sub = first.subscribe(address, "/x")
    msg = sub.recv(timeout=30)
    kept = np.from_dlpack(msg["x"])
    assert kept[0, 0] == 0
    for _ in range(7):
        sub.recv(timeout=30)
    assert tx.line()["sent"] == 0
    del msg, sub
    first.close()
    assert tx.line()["idle"] == 0, "the sender saw the first subscriber go"
    # A second subscriber: the sender fills its slots again.
    second = tf.Node()
    sub = second.subscribe(address, "/x")
    got = [sub.recv(timeout=30)["x"] for _ in range(8)]
    assert tx.line()["sent"] == 1
    assert [np.asarray(t)[0, 0] for t in got] == [100 + i for i in range(8)]
    assert (kept == 0).all(), "the view kept its bytes"
    sub.close()
    second.close()
    tx.wait()
