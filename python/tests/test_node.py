"""Nodes, recording and replay, device maps, devices() and check_map()."""

import json
import pathlib

import numpy as np
import pytest

import tensorferry as tf
from conftest import unique

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def test_a_node_reports_its_name_and_addresses():
    name = unique("inproc")
    with tf.Node(listen=["tcp://127.0.0.1:0", f"inproc://{name}"], name="trainer-0") as node:
        assert node.name == "trainer-0"
        assert node.address.startswith("tcp://127.0.0.1:") and not node.address.endswith(":0")
        assert node.addresses[1] == f"inproc://{name}"
        assert "trainer-0" in repr(node)


def test_inproc_between_nodes_of_one_process():
    name = unique("inproc")
    server = tf.Node(listen=f"inproc://{name}")
    sub = tf.Node().subscribe(f"inproc://{name}", "/x")
    pub = server.publisher("/x")
    pub.wait_for_subscribers(1, timeout=5)
    a = np.arange(8, dtype=np.int16)
    pub.send(x=a)
    got = sub.recv(timeout=5)
    assert got["x"].data_ptr == a.ctypes.data  # by reference, within the process


def test_recording_and_replay(tmp_path):
    path = f"file://{tmp_path / 'run.tfm'}"
    node = tf.Node()
    with node.record(path, "/x") as rec:
        pub = node.publisher("/x")
        for i in range(3):
            pub.send({"i": i}, x=np.full((2, 2), i, np.float32))
        node.publisher("/other").send({"skip": True})
    with pytest.raises(tf.InvalidArgument):
        rec.stop()
    replay = tf.Node().subscribe(path, "/x")
    got = list(replay)
    assert [m.fields["i"] for m in got] == [0, 1, 2]
    assert [m.seq for m in got] == [0, 1, 2]
    np.testing.assert_array_equal(np.asarray(got[2]["x"]), np.full((2, 2), 2, np.float32))


def test_recording_needs_a_file_address():
    with pytest.raises(tf.InvalidArgument):
        tf.Node().record("tcp://127.0.0.1:1")


def test_a_channel_configuration_applies_wire_casts_and_checksums():
    config = {
        "channels": {
            "/act": {
                "device_map": {"cpu": "cuda:0"},
                "fallback": "cpu",
                "wire_dtype": {"f32": "bf16"},
                "keep_wire_dtype": True,
                "checksum": True,
            }
        }
    }
    rx = tf.Node(listen="tcp://127.0.0.1:0", config=config)
    sub = rx.subscriber("/act")
    tx = tf.Node(config=config)
    pub = tx.publisher("/act")
    tx.connect(rx.address)
    pub.wait_for_subscribers(1, timeout=10)
    x = np.array([1.0, -2.5, 3.0, 0.15625], np.float32)
    pub.send(x=x)
    t = sub.recv(timeout=10)["x"]
    assert t.dtype == "bf16" and t.device == "cpu"
    # bf16 is the top half of the f32 bits for these exactly representable values.
    bits = np.asarray(t.view("u16"))
    np.testing.assert_array_equal(bits, (x.view(np.uint32) >> 16).astype(np.uint16))


def test_bf16_and_fp8_export_their_dlpack_codes():
    import ctypes

    class DLTensor(ctypes.Structure):
        _fields_ = [
            ("data", ctypes.c_void_p),
            ("device_type", ctypes.c_int32),
            ("device_id", ctypes.c_int32),
            ("ndim", ctypes.c_int32),
            ("code", ctypes.c_uint8),
            ("bits", ctypes.c_uint8),
            ("lanes", ctypes.c_uint16),
            ("shape", ctypes.POINTER(ctypes.c_int64)),
            ("strides", ctypes.POINTER(ctypes.c_int64)),
            ("byte_offset", ctypes.c_uint64),
        ]

    class Versioned(ctypes.Structure):
        _fields_ = [
            ("major", ctypes.c_uint32),
            ("minor", ctypes.c_uint32),
            ("ctx", ctypes.c_void_p),
            ("deleter", ctypes.c_void_p),
            ("flags", ctypes.c_uint64),
            ("tensor", DLTensor),
        ]

    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.py_object, ctypes.c_char_p]
    name_of = ctypes.pythonapi.PyCapsule_GetName
    name_of.restype = ctypes.c_char_p
    name_of.argtypes = [ctypes.py_object]

    bits = np.arange(6, dtype=np.uint16).reshape(2, 3)
    for dtype, code, nbits in [("bf16", 4, 16), ("f16", 2, 16)]:
        t = tf.tensor(bits, dtype)
        cap = t.__dlpack__(max_version=(1, 0))
        assert name_of(cap) == b"dltensor_versioned"
        m = Versioned.from_address(get(cap, b"dltensor_versioned"))
        assert (m.major, m.flags & 1) == (1, 1)  # version 1, read-only
        assert (m.tensor.code, m.tensor.bits, m.tensor.lanes) == (code, nbits, 1)
        assert m.tensor.data == bits.ctypes.data
        assert [m.tensor.shape[i] for i in range(2)] == [2, 3]
        assert [m.tensor.strides[i] for i in range(2)] == [3, 1]
        assert name_of(t.__dlpack__()) == b"dltensor"
    for dtype, code in [("f8e4m3", 10), ("f8e5m2", 12)]:
        cap = tf.tensor(np.zeros(4, np.uint8), dtype).__dlpack__(max_version=(1, 1))
        m = Versioned.from_address(get(cap, b"dltensor_versioned"))
        assert (m.tensor.code, m.tensor.bits) == (code, 8)
    with pytest.raises(ValueError):
        tf.tensor(bits, "f32")  # sizes differ


def test_dlpack_copy_gives_a_writable_copy():
    node = tf.Node()
    sub = node.subscriber("/x")
    a = np.arange(4.0)
    node.publisher("/x").send(x=a)
    t = sub.recv(timeout=5)["x"]
    c = np.from_dlpack(t, copy=True)
    assert c.flags.writeable and c.ctypes.data != a.ctypes.data
    c[0] = 9
    assert a[0] == 0


def test_the_unversioned_dlpack_form_exports_copies_and_the_versioned_one_read_only_views():
    node = tf.Node()
    sub = node.subscriber("/x")
    a = np.arange(6.0)
    node.publisher("/x").send(x=a)
    t = sub.recv(timeout=5)["x"]

    class Legacy:
        """A producer wrapper that only speaks the unversioned form."""

        def __dlpack_device__(self):
            return t.__dlpack_device__()

        def __dlpack__(self, **kw):
            return t.__dlpack__()

    old = np.from_dlpack(Legacy())
    # A copy: whatever its consumer does with it, the message is untouched.
    assert old.ctypes.data != t.data_ptr
    np.testing.assert_array_equal(old, a)
    view = np.from_dlpack(t)
    assert view.ctypes.data == t.data_ptr and not view.flags.writeable
    with pytest.raises(BufferError):
        t.__dlpack__(copy=False)
    with pytest.raises(BufferError):
        t.__dlpack__(max_version=(1, 0), dl_device=(2, 0))


def test_stats_count_what_a_node_sent_and_received():
    rx = tf.Node(listen="tcp://127.0.0.1:0")
    sub = rx.subscriber("/s")
    tx = tf.Node()
    pub = tx.publisher("/s")
    tx.connect(rx.address)
    pub.wait_for_subscribers(1, timeout=10)
    for i in range(3):
        pub.send({"i": i}, x=np.zeros(1000, np.float32))
    for _ in range(3):
        sub.recv(timeout=10)
    sent, got = tx.stats(), rx.stats()
    assert sent["messages_sent"] == 3 and sent["bytes_sent"] > 3 * 4000
    assert got["messages_received"] == 3 and got["bytes_received"] == sent["bytes_sent"]
    assert got["peers"] == 1 and got["rejected"] == 0
    assert rx.channel_stats("/s")["messages_received"] == 3
    assert rx.channel_stats("/never") == {
        "messages_received": 0,
        "bytes_received": 0,
        "messages_sent": 0,
        "bytes_sent": 0,
    }


def test_devices_lists_the_host():
    d = tf.devices()
    assert d["cpu"]["cores"] >= 1
    assert "devices" in d["cuda"] and isinstance(d["inventory"], list)


def test_check_map_reports_each_channel(tmp_path):
    report = tf.check_map(EXAMPLES / "channels.json", devices="cpu,cuda:0,cuda:1")
    assert report["valid"] is True and not report["errors"]
    assert "/camera" in report["channels"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"channels": {"/d": {"pattern": "reqrep", "device_map": {"cuda:0": "cuda:1", "cuda:2": "cuda:1"}}}}))
    report = tf.check_map(bad, devices="cpu,cuda:0,cuda:1,cuda:2")
    assert report["valid"] is False
    assert report["errors"][0]["channel"] == "/d"


def test_help_is_useful():
    doc = tf.Node.__doc__
    assert "listen" in doc and "config" in doc
    for method in ("publisher", "subscribe", "serve", "request", "record"):
        assert getattr(tf.Node, method).__doc__, method
    assert tf.Subscription.recv.__doc__ and "timeout" in tf.Subscription.recv.__doc__
    assert "DLPack" in tf.Tensor.__doc__


def test_tcp_peers_must_share_the_secret(tmp_path, monkeypatch):
    secret = tmp_path / "secret"
    secret.write_text("correct horse battery staple, long enough\n")
    monkeypatch.setenv("TF_TEST_SECRET", "correct horse battery staple, long enough")
    server = tf.Node(listen="tcp://127.0.0.1:0", secret_file=secret)
    server.serve("/ping", lambda r: {"pong": True})
    friend = tf.Node(secret_env="TF_TEST_SECRET")
    assert friend.request(server.address, "/ping", timeout=10).fields == {"pong": True}
    with pytest.raises((tf.PeerLost, tf.IoError, tf.TimeoutError)):
        tf.Node(connect_timeout=1).request(server.address, "/ping", timeout=5)


def test_the_type_stubs_match_the_module():
    import subprocess
    import sys

    pytest.importorskip("mypy")
    done = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "tensorferry._native"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
