"""Request/reply services in another process, and their errors."""

import threading
import time

import numpy as np
import pytest

import tensorferry as tf

SERVER = """
import time

def add(request):
    a, b = np.asarray(request["a"]), np.asarray(request["b"])
    return {"n": int(a.size), "note": request.fields.get("note")}, {"sum": a + b}

def divide(request):
    return {"q": request.fields["x"] / request.fields["y"]}

def refuse(request):
    raise tf.ServiceError("not_ready", "warming up, try again in 2 s")

def slow(request):
    time.sleep(float(request.fields["seconds"]))
    return None

def echo(request):
    return request

def bad(request):
    return 42

node = tf.Node(listen=sys.argv[1])
node.serve("/add", add, input=tf.Schema().tensor("a", "f32", "*").tensor("b", "f32", "*"))
node.serve("/divide", divide)
node.serve("/refuse", refuse)
node.serve("/slow", slow)
node.serve("/echo", echo)
node.serve("/bad", bad)
emit(address=node.address)
sys.stdin.read()  # serve until the test closes stdin
"""


@pytest.fixture(scope="module")
def server():
    import subprocess
    import sys
    import textwrap

    from conftest import Peer

    p = subprocess.Popen(
        [sys.executable, "-c", Peer.PRELUDE + textwrap.dedent(SERVER), "tcp://127.0.0.1:0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    import json

    line = p.stdout.readline()
    if not line:
        pytest.fail("the server did not start: " + p.stderr.read())
    yield json.loads(line)["address"]
    p.stdin.close()
    p.wait(30)


def test_a_request_is_answered_with_fields_and_tensors(server):
    client = tf.Node()
    a = np.arange(5, dtype=np.float32)
    reply = client.request(server, "/add", {"note": "hi"}, a=a, b=a * 10, timeout=10)
    assert reply.fields == {"n": 5, "note": "hi"}
    np.testing.assert_array_equal(np.from_dlpack(reply["sum"]), a * 11)
    assert reply.channel == "/add" and reply.sender == server


def test_a_handler_exception_becomes_an_error_reply_with_its_message(server):
    client = tf.Node()
    with pytest.raises(tf.ServiceError) as e:
        client.request(server, "/divide", {"x": 1, "y": 0}, timeout=10)
    assert e.value.code == "ZeroDivisionError"
    assert "division by zero" in e.value.message
    assert e.value.channel == "/divide"
    with pytest.raises(tf.ServiceError) as e:
        client.request(server, "/divide", {"x": 1}, timeout=10)
    assert e.value.code == "KeyError" and "'y'" in e.value.message


def test_a_handler_chooses_its_error_code_with_service_error(server):
    with pytest.raises(tf.ServiceError) as e:
        tf.Node().request(server, "/refuse", timeout=10)
    assert (e.value.code, e.value.message) == ("not_ready", "warming up, try again in 2 s")
    assert "warming up" in str(e.value)


def test_the_schema_refuses_a_request_before_the_handler(server):
    with pytest.raises(tf.ServiceError) as e:
        tf.Node().request(server, "/add", a=np.zeros(3, np.int64), b=np.zeros(3, np.float32), timeout=10)
    assert e.value.code == "bad_request"
    assert "dtype i64" in e.value.message


def test_a_reply_the_handler_cannot_make_is_an_error(server):
    with pytest.raises(tf.ServiceError) as e:
        tf.Node().request(server, "/bad", timeout=10)
    assert e.value.code == "bad_reply" and "int" in e.value.message


def test_an_unknown_service_is_an_error_reply(server):
    with pytest.raises(tf.ServiceError) as e:
        tf.Node().request(server, "/nothing-here", timeout=10)
    assert "/nothing-here" in str(e.value)


def test_a_request_times_out(server):
    start = time.monotonic()
    with pytest.raises(tf.TimeoutError) as e:
        tf.Node().request(server, "/slow", {"seconds": 10}, timeout=0.3)
    assert time.monotonic() - start < 5  # it gave up, not waited for the handler
    assert isinstance(e.value, TimeoutError)
    assert "/slow" in str(e.value)


def test_an_echo_returns_the_request_tensors(server):
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    reply = tf.Node().request(server, "/echo", {"k": [1, 2]}, x=x, timeout=10)
    assert reply.fields == {"k": [1, 2]}
    np.testing.assert_array_equal(np.asarray(reply["x"]), x)


def test_a_service_in_this_process_sees_requests_as_messages():
    node = tf.Node(listen="tcp://127.0.0.1:0")
    seen = []

    def scale(request):
        seen.append((request.channel, sorted(request.fields), request.keys()))
        return tf.Message({"ok": True}, y=np.asarray(request["x"]) * 2)

    node.serve("/scale", scale)
    with pytest.raises(tf.InvalidArgument):
        node.serve("/scale", scale)
    reply = tf.Node().request(node.address, "/scale", {"f": 1}, x=np.ones(3), timeout=10)
    np.testing.assert_array_equal(np.asarray(reply["y"]), np.full(3, 2.0))
    assert seen == [("/scale", ["f"], ["x"])]


def test_a_handler_thread_keeps_its_thread_locals_from_one_request_to_the_next():
    # Handlers may keep per-thread resources (a stream, a connection) in a
    # threading.local: each service thread is one Python thread for its life.
    node = tf.Node(listen="tcp://127.0.0.1:0", service_threads=1)
    local = threading.local()

    def count(request):
        local.calls = getattr(local, "calls", 0) + 1
        return {"calls": local.calls, "thread": threading.get_ident()}

    node.serve("/count", count)
    client = tf.Node()
    replies = [client.request(node.address, "/count", timeout=10).fields for _ in range(5)]
    assert [r["calls"] for r in replies] == [1, 2, 3, 4, 5]
    assert len({r["thread"] for r in replies}) == 1
    assert replies[0]["thread"] != threading.get_ident()
    node.close()


def test_a_request_to_nowhere_fails():
    with pytest.raises((tf.IoError, tf.PeerLost)):
        tf.Node(connect_timeout=0.3).request("tcp://127.0.0.1:1", "/x", timeout=5)
