"""Stores and proxies: put and get in memory and directory stores, proxies
resolved in another process and from a served store, the proxy cache, and
every error a store or a proxy raises."""

import asyncio
import json
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import tensorferry as tf
from conftest import Peer


def sample(seed: int, shape=(64, 32)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(params=["memory", "dir"])
def store(request, tmp_path):
    if request.param == "memory":
        return tf.Store.memory()
    return tf.Store.dir(tmp_path / "store")


@pytest.fixture
def cache_limit():
    """Restores the proxy cache's limit after the test."""
    before = tf.proxy_cache_stats()["limit"]
    yield
    tf.set_proxy_cache_limit(before)


SERVED = """
node = tf.Node(listen="tcp://127.0.0.1:0")
store = tf.Store.memory()
store.serve(node)
w = np.random.default_rng(int(sys.argv[1])).standard_normal((128, 64)).astype(np.float32)
key = store.put({"step": 9}, w=w)
named = store.served_at(node.address)
emit(
    address=node.address,
    key=key,
    proxy=named.proxy(key).to_json(),
    spare=named.put_proxy(x=np.arange(10.0)).to_json(),
)
sys.stdin.read()  # serve until the test closes stdin
"""


class Served:
    """A store served by a node in a child process."""

    def __init__(self, seed: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", Peer.PRELUDE + textwrap.dedent(SERVED), str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            pytest.fail("the store server did not start: " + self.proc.stderr.read())
        self.info = json.loads(line)
        self.address = self.info["address"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()


@pytest.fixture
def served():
    s = Served(seed=11)
    yield s
    s.stop()


# Put, get, exists, evict, list.


def test_put_get_exists_evict_and_list_round_trip(store):
    w = sample(0)
    key = store.put({"step": 7, "tag": "a"}, tensors={"a.b": np.arange(4)}, w=w)
    assert len(key) == 32
    assert store.exists(key)
    msg = store.get(key)
    assert msg.fields == {"step": 7, "tag": "a"}
    assert msg.keys() == ["a.b", "w"]
    np.testing.assert_array_equal(np.from_dlpack(msg["w"]), w)
    np.testing.assert_array_equal(np.asarray(msg["a.b"]), np.arange(4))

    [entry] = store.list()
    assert entry["key"] == key and entry["bytes"] > w.nbytes
    manifest = store.manifest(key)
    assert manifest["key"] == key
    assert [(t["name"], t["dtype"], t["shape"], t["bytes"]) for t in manifest["tensors"]] == [
        ("a.b", "i64", [4], 32),
        ("w", "f32", [64, 32], w.nbytes),
    ]

    assert store.evict(key) is True
    assert store.evict(key) is False
    assert not store.exists(key)
    assert store.list() == []
    # What was fetched stays readable after the key is gone.
    np.testing.assert_array_equal(np.from_dlpack(msg["w"]), w)


def test_a_put_copies_the_bytes_then(store):
    a = np.zeros(8, np.float32)
    key = store.put(a=a)
    a[:] = 1
    np.testing.assert_array_equal(np.asarray(store.get(key)["a"]), np.zeros(8, np.float32))


def test_a_key_is_written_once_unless_overwrite_is_asked_for(store):
    assert store.put({"v": 1}, key="weights-1") == "weights-1"
    with pytest.raises(tf.AlreadyStored) as e:
        store.put({"v": 2}, key="weights-1")
    assert isinstance(e.value, tf.StoreError)
    assert e.value.key == "weights-1" and e.value.store == store.location
    assert "overwrite" in str(e.value)
    assert store.put({"v": 3}, key="weights-1", overwrite=True) == "weights-1"
    assert store.get("weights-1").fields == {"v": 3}
    with pytest.raises(tf.InvalidArgument, match="key="):
        store.put({"v": 4}, overwrite=True)
    with pytest.raises(tf.InvalidArgument, match="`/` is not allowed"):
        store.put({"v": 5}, key="up/escape")


def test_stores_open_from_their_location_text(tmp_path):
    d = tf.Store.dir(tmp_path / "s")
    assert d.location.startswith("dir:")
    assert tf.Store.open(d.location).location == d.location
    assert tf.Store.open(str(tmp_path / "s")).location == d.location
    m = tf.Store.memory("test-store-open")
    key = m.put(x=np.ones(2))
    assert m.location == "memory:test-store-open"
    assert tf.Store.open("memory:test-store-open").exists(key)
    served = tf.Store.open("tcp://127.0.0.1:1#/elsewhere", node=tf.Node())
    assert served.location == "tcp://127.0.0.1:1#/elsewhere"
    assert tf.Store.open("tcp://127.0.0.1:1", node=tf.Node()).location == "tcp://127.0.0.1:1"
    assert tf.DEFAULT_STORE_CHANNEL == "/tensorferry/store"
    with pytest.raises(tf.InvalidArgument, match="not in this process"):
        tf.Store.open("memory:no-such-store")
    with pytest.raises(tf.InvalidArgument, match="dir:PATH"):
        tf.Store.open("")
    with pytest.raises(tf.InvalidArgument):
        tf.Store.remote(tf.Node(), "not an address")


# Proxies.


def test_a_proxy_describes_its_tensors_and_travels_as_json(tmp_path):
    store = tf.Store.dir(tmp_path)
    w = sample(1)
    p = store.put_proxy({"step": 1}, w=w)
    assert p.location == store.location and store.exists(p.key)
    [t] = p.tensors
    assert (t["name"], t["dtype"], t["shape"], t["bytes"]) == ("w", "f32", [64, 32], w.nbytes)
    assert len(t["checksum"]) == 16 and p.nbytes == w.nbytes
    j = p.to_json()
    assert tf.is_proxy(p) and tf.is_proxy(j)
    assert not tf.is_proxy({"key": p.key}) and not tf.is_proxy("text")
    for q in (tf.Proxy.from_json(j), tf.Proxy.from_json(json.dumps(j))):
        assert not q.is_resolved()
        msg = q.resolve(timeout=10)
        assert q.is_resolved()
        assert msg.fields == {"step": 1}
        np.testing.assert_array_equal(np.from_dlpack(msg["w"]), w)


def test_a_proxy_as_a_field_value_travels_as_its_json():
    store = tf.Store.memory()
    w = sample(2)
    proxy = store.put_proxy(w=w)
    node = tf.Node()
    sub = node.subscriber("/proxies")
    node.publisher("/proxies").send({"weights": proxy, "step": 4})
    msg = sub.recv(timeout=5)
    assert tf.is_proxy(msg.fields["weights"]) and msg.fields["step"] == 4
    got = tf.Proxy.from_json(msg.fields["weights"]).resolve()
    np.testing.assert_array_equal(np.from_dlpack(got["w"]), w)
    key = store.put({"nested": [proxy]})
    assert store.get(key).fields["nested"][0] == proxy.to_json()


def test_a_proxy_of_one_tensor_gives_the_tensor(store):
    w = sample(3)
    p = store.put_proxy(w=w)
    t = p.tensor()
    assert isinstance(t, tf.Tensor)
    np.testing.assert_array_equal(np.from_dlpack(t), w)
    two = store.put_proxy(a=np.ones(2), b=np.ones(3))
    with pytest.raises(tf.InvalidArgument, match="2 tensors"):
        two.tensor()


def test_verify_reads_every_byte_and_resolve_to_lands_on_a_channel(store):
    w = sample(4)
    p = store.put_proxy({"k": 1}, w=w)
    np.testing.assert_array_equal(np.from_dlpack(p.verify()["w"]), w)
    landed = p.resolve_to(tf.Node(), "/weights")
    assert landed.channel == "/weights" and landed.fields == {"k": 1}
    np.testing.assert_array_equal(np.from_dlpack(landed["w"]), w)


DIR_PUTTER = """
store = tf.Store.dir(sys.argv[1])
w = np.random.default_rng(5).standard_normal((256, 128)).astype(np.float32)
proxy = store.put_proxy({"step": 5}, w=w)
emit(proxy=proxy.to_json())
"""


def test_a_dir_store_proxy_resolves_in_another_process(peer, tmp_path):
    child = peer(DIR_PUTTER, str(tmp_path / "shared"))
    proxy = tf.Proxy.from_json(child.line()["proxy"])
    child.wait()
    msg = proxy.resolve(timeout=30)
    assert msg.fields == {"step": 5}
    np.testing.assert_array_equal(np.from_dlpack(msg["w"]), sample(5, (256, 128)))


def test_a_served_store_is_reached_from_another_process(served):
    want = np.random.default_rng(11).standard_normal((128, 64)).astype(np.float32)
    key = served.info["key"]
    proxy = tf.Proxy.from_json(served.info["proxy"])
    assert proxy.location == served.address
    msg = proxy.resolve(timeout=30)
    assert msg.fields == {"step": 9}
    np.testing.assert_array_equal(np.from_dlpack(msg["w"]), want)

    remote = tf.Store.remote(tf.Node(), served.address, timeout=30)
    assert remote.location == served.address
    assert remote.exists(key) and key in [e["key"] for e in remote.list()]
    np.testing.assert_array_equal(np.from_dlpack(tf.Store.open(served.address).get(key)["w"]), want)
    mine = remote.put({"from": "parent"}, y=np.arange(3.0), key="from-parent")
    assert remote.get(mine).fields == {"from": "parent"}
    with pytest.raises(tf.AlreadyStored):
        remote.put(y=np.arange(3.0), key="from-parent")
    with pytest.raises(tf.NotStored):
        remote.get("never-put")
    assert remote.proxy(mine).location == served.address


def test_resolve_async_fetches_while_the_caller_computes(served):
    proxy = tf.Proxy.from_json(served.info["proxy"])
    before = tf.proxy_cache_stats()
    fetch = proxy.resolve_async()
    assert isinstance(fetch, tf.Fetch)
    # Compute, and look whether the fetch is done, without resolving.
    a = np.random.default_rng(0).standard_normal((128, 128))
    deadline = time.monotonic() + 20
    while not proxy.is_resolved() and time.monotonic() < deadline:
        a = np.tanh(a @ a.T / 128)
    assert proxy.is_resolved()  # fetched in the background: resolve() was never called
    after = tf.proxy_cache_stats()
    assert after["misses"] == before["misses"] + 1  # it fetched, not the cache
    start = time.monotonic()
    msg = proxy.resolve()
    assert time.monotonic() - start < 1.0
    assert msg.fields == {"step": 9}


def test_a_fetch_started_ahead_is_awaited_under_asyncio(served):
    async def stage():
        proxy = tf.Proxy.from_json(served.info["proxy"])
        fetch = proxy.resolve_async()  # starts now
        await asyncio.sleep(0)  # the loop goes on meanwhile
        return await fetch

    tf.clear_proxy_cache()
    msg = asyncio.run(stage())
    assert msg.fields == {"step": 9}


def test_a_second_proxy_of_a_key_is_a_cache_hit(store):
    key = store.put(w=sample(6))
    first = store.proxy(key)
    first.resolve()
    before = tf.proxy_cache_stats()
    second = tf.Proxy.from_json(first.to_json())
    np.testing.assert_array_equal(np.from_dlpack(second.tensor()), sample(6))
    after = tf.proxy_cache_stats()
    assert after["hits"] == before["hits"] + 1
    assert after["misses"] == before["misses"]


def test_the_cache_stays_under_its_byte_limit(cache_limit):
    store = tf.Store.memory()
    tf.clear_proxy_cache()
    assert tf.proxy_cache_stats()["entries"] == 0
    keys = [store.put(w=sample(i, (128, 128))) for i in range(5)]
    frame = store.manifest(keys[0])["frame_bytes"]
    tf.set_proxy_cache_limit(3 * frame + 100)
    before = tf.proxy_cache_stats()
    for key in keys:
        store.proxy(key).resolve()
    after = tf.proxy_cache_stats()
    assert after["limit"] == 3 * frame + 100
    assert after["entries"] == 3 and after["bytes"] <= after["limit"]
    assert after["evictions"] == before["evictions"] + 2
    # The oldest was dropped: resolving it again fetches.
    store.proxy(keys[0]).resolve()
    assert tf.proxy_cache_stats()["misses"] == after["misses"] + 1
    tf.set_proxy_cache_limit(0)
    assert tf.proxy_cache_stats()["entries"] == 0


# Errors.


def test_unknown_and_evicted_keys_raise_not_stored(store):
    with pytest.raises(tf.NotStored) as e:
        store.get("never-put")
    assert isinstance(e.value, KeyError) and isinstance(e.value, tf.StoreError)
    assert e.value.key == "never-put" and e.value.store == store.location
    assert "never put there, or was evicted" in str(e.value)
    with pytest.raises(KeyError):
        store.proxy("never-put")
    key = store.put(w=np.ones(3))
    proxy = store.proxy(key)
    store.evict(key)
    with pytest.raises(tf.NotStored):
        proxy.resolve()


def test_a_proxy_of_replaced_data_raises_proxy_mismatch(store):
    store.put(w=np.zeros(16, np.float32), key="model")
    stale = store.proxy("model")
    store.put(w=np.ones(16, np.float32), key="model", overwrite=True)
    with pytest.raises(tf.ProxyMismatch) as e:
        stale.resolve()
    assert e.value.key == "model" and "overwritten" in str(e.value)
    np.testing.assert_array_equal(np.asarray(store.proxy("model").tensor()), np.ones(16))
    store.put(w=np.ones(4, np.float32), key="model", overwrite=True)
    with pytest.raises(tf.ProxyMismatch, match="shape"):
        tf.Proxy.from_json(stale.to_json()).resolve()


def test_a_proxy_of_a_value_put_again_raises_proxy_mismatch(store):
    # Only the fields, or only a serialized value, changed: still another entry.
    store.put({"step": 1}, w=np.zeros(4, np.float32), key="fields")
    stale = store.proxy("fields")
    store.put({"step": 2}, w=np.zeros(4, np.float32), key="fields", overwrite=True)
    with pytest.raises(tf.ProxyMismatch, match="fields or objects"):
        stale.resolve()
    store.put({"lr": 0.1}, key="config", serializer=pickle.dumps)
    stale = store.proxy("config")
    store.put({"lr": 0.2}, key="config", overwrite=True, serializer=pickle.dumps)
    with pytest.raises(tf.ProxyMismatch):
        stale.resolve(deserializer=pickle.loads)
    assert store.proxy("config").resolve(deserializer=pickle.loads) == {"lr": 0.2}


def test_a_stopped_store_is_unreachable(served):
    address = served.address
    served.stop()
    proxy = tf.Proxy.from_json(served.info["spare"])
    proxy.set_node(tf.Node(connect_timeout=0.5))
    with pytest.raises(tf.StoreUnreachable) as e:
        proxy.resolve(timeout=30)
    assert isinstance(e.value, ConnectionError) and e.value.store == address
    assert address in str(e.value)
    with pytest.raises(tf.StoreUnreachable):
        tf.Store.remote(tf.Node(connect_timeout=0.5), address, timeout=10).exists(served.info["key"])


def test_a_peer_without_the_secret_is_refused(tmp_path, monkeypatch):
    phrase = "correct horse battery staple, long enough"
    (tmp_path / "secret").write_text(phrase + "\n")
    monkeypatch.setenv("TF_TEST_STORE_SECRET", phrase)
    server = tf.Node(listen="tcp://127.0.0.1:0", secret_file=tmp_path / "secret")
    store = tf.Store.memory()
    store.serve(server)
    key = store.put(w=np.ones(3))

    stranger = tf.Node(connect_timeout=1)
    with pytest.raises(tf.StoreUnreachable):
        tf.Store.remote(stranger, server.address, timeout=5).exists(key)
    proxy = store.served_at(server.address).proxy(key)
    proxy.set_node(stranger)
    with pytest.raises(tf.StoreUnreachable):
        proxy.resolve(timeout=30)

    friend = tf.Node(secret_env="TF_TEST_STORE_SECRET")
    assert tf.Store.remote(friend, server.address, timeout=10).exists(key)
    try:
        tf.set_store_client_node(friend)
        fresh = tf.Proxy.from_json(store.served_at(server.address).proxy(key).to_json())
        np.testing.assert_array_equal(np.asarray(fresh.tensor(timeout=30)), np.ones(3))
    finally:
        tf.set_store_client_node(tf.Node())


def test_a_memory_store_of_another_process_says_how_to_reach_it():
    proxy = tf.Proxy.from_json(
        {"tensorferry_proxy": 1, "store": {"kind": "memory", "name": "elsewhere"}, "key": "k", "tensors": []}
    )
    with pytest.raises(tf.InvalidArgument, match="serve it"):
        proxy.resolve()


def test_malformed_proxies_are_refused_with_the_reason():
    with pytest.raises(tf.InvalidArgument, match="format version 2"):
        tf.Proxy.from_json({"tensorferry_proxy": 2})
    with pytest.raises(tf.InvalidArgument, match="tensorferry_proxy"):
        tf.Proxy.from_json({"key": "k"})
    with pytest.raises(tf.InvalidArgument, match="not a valid proxy"):
        tf.Proxy.from_json("{not json")
    with pytest.raises(TypeError):
        tf.Proxy.from_json(42)
    lying = {
        "tensorferry_proxy": 1,
        "store": {"kind": "memory", "name": "x"},
        "key": "k",
        "tensors": [{"name": "w", "dtype": "f32", "shape": [4], "bytes": 3, "checksum": "0" * 16}],
    }
    with pytest.raises(tf.InvalidArgument, match="says 3 bytes"):
        tf.Proxy.from_json(lying)


SLEEPY_STORE = """
import time
node = tf.Node(listen="tcp://127.0.0.1:0")
node.serve("/slow-store", lambda r: time.sleep(60))
proxy = tf.Proxy.from_json({
    "tensorferry_proxy": 1,
    "store": {"kind": "served", "addr": node.address, "channel": "/slow-store"},
    "key": "k",
    "tensors": [],
})
emit(ready=True)
start = time.monotonic()
try:
    proxy.resolve()
    emit(outcome="returned")
except KeyboardInterrupt:
    emit(outcome="interrupted", after=time.monotonic() - start)
"""


def test_ctrl_c_interrupts_resolve(peer):
    p = peer(SLEEPY_STORE)
    assert p.line()["ready"]
    time.sleep(0.3)  # let it block
    sent = time.monotonic()
    p.proc.send_signal(signal.SIGINT)
    assert p.line(timeout=10)["outcome"] == "interrupted"
    assert time.monotonic() - sent < 5
    p.wait()


def test_resolve_gives_up_after_its_timeout():
    node = tf.Node(listen="tcp://127.0.0.1:0")
    node.serve("/slow-store", lambda r: time.sleep(1))
    proxy = tf.Proxy.from_json(
        {
            "tensorferry_proxy": 1,
            "store": {"kind": "served", "addr": node.address, "channel": "/slow-store"},
            "key": "k",
            "tensors": [],
        }
    )
    start = time.monotonic()
    with pytest.raises(tf.TimeoutError, match="proxy `k`"):
        proxy.resolve(timeout=0.2)
    assert time.monotonic() - start < 0.9


# Serializers.


def test_a_serializer_round_trips_any_object(store):
    obj = {"name": "run-3", "weights": np.arange(5.0), "nested": [1, (2, 3)]}

    def same(got):
        assert got["name"] == "run-3" and got["nested"] == [1, (2, 3)]
        np.testing.assert_array_equal(got["weights"], np.arange(5.0))

    key = store.put(obj, serializer=pickle.dumps)
    same(store.get(key, deserializer=pickle.loads))
    same(store.proxy(key).resolve(deserializer=pickle.loads))
    same(store.put_proxy(obj, serializer=pickle.dumps).resolve(deserializer=pickle.loads))
    assert store.put(obj, key="config", serializer=pickle.dumps) == "config"
    store.put([1, 2], key="config", overwrite=True, serializer=lambda o: bytearray(json.dumps(o).encode()))
    assert store.get("config", deserializer=json.loads) == [1, 2]
    assert store.get(store.put(None, serializer=pickle.dumps), deserializer=pickle.loads) is None


def test_serializer_misuse_says_what_to_change(store):
    key = store.put({"a": 1}, serializer=pickle.dumps)
    with pytest.raises(tf.InvalidArgument, match="deserializer="):
        store.get(key)
    with pytest.raises(tf.InvalidArgument, match="deserializer="):
        store.proxy(key).resolve()
    plain = store.put({"a": 1}, x=np.ones(2))
    with pytest.raises(tf.InvalidArgument, match="without serializer="):
        store.get(plain, deserializer=pickle.loads)
    with pytest.raises(TypeError, match="bytes or bytearray"):
        store.put({"a": 1}, serializer=str)
    with pytest.raises(TypeError, match="one object"):
        store.put({"a": 1}, serializer=pickle.dumps, x=np.ones(2))
    with pytest.raises(TypeError, match="callable"):
        store.get(key, deserializer="pickle")
    with pytest.raises(ZeroDivisionError):
        store.put({"a": 1}, serializer=lambda o: 1 / 0)


def test_the_store_calls_are_documented():
    for call in (tf.Store.put, tf.Store.get, tf.Proxy.resolve, tf.Proxy.resolve_async, tf.set_proxy_cache_limit):
        assert call.__doc__, call
    assert "Ctrl-C" in tf.Proxy.resolve.__doc__
    assert "NotStored" in tf.Store.get.__doc__
