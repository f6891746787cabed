"""The asyncio twins of every waiting call."""

import asyncio

import numpy as np
import pytest

import tensorferry as tf


def test_recv_async_waits_without_blocking_the_loop():
    async def main():
        node = tf.Node()
        sub = node.subscriber("/x")
        pub = node.publisher("/x")
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        pending = asyncio.ensure_future(sub.recv_async())
        await asyncio.sleep(0.2)
        assert not pending.done() and ticks >= 2  # the loop ran meanwhile
        await pub.send_async({"n": 1}, x=np.arange(3))
        msg = await asyncio.wait_for(pending, 5)
        t.cancel()
        return msg

    msg = asyncio.run(main())
    assert msg.fields == {"n": 1}
    np.testing.assert_array_equal(np.asarray(msg["x"]), np.arange(3))


def test_a_cancelled_recv_takes_nothing_off_the_queue():
    async def main():
        node = tf.Node()
        sub = node.subscriber("/x")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(sub.recv_async(), 0.1)
        node.publisher("/x").send({"n": 7})
        return await asyncio.wait_for(sub.recv_async(), 5)

    assert asyncio.run(main()).fields == {"n": 7}


def test_request_and_wait_for_subscribers_async_across_nodes():
    async def main():
        server = tf.Node(listen="tcp://127.0.0.1:0")
        server.serve("/double", lambda r: ({}, {"y": np.asarray(r["x"]) * 2}))
        client = tf.Node()
        reply = await asyncio.wait_for(
            client.request_async(server.address, "/double", x=np.arange(4.0)), 10
        )
        pub = server.publisher("/ticks")
        sub = client.subscribe(server.address, "/ticks")
        await asyncio.wait_for(pub.wait_for_subscribers_async(1), 10)
        await pub.send_async({"t": 1})
        got = await asyncio.wait_for(sub.recv_async(), 10)
        with pytest.raises(tf.ServiceError):
            await asyncio.wait_for(client.request_async(server.address, "/missing"), 10)
        return reply, got

    reply, got = asyncio.run(main())
    np.testing.assert_array_equal(np.asarray(reply["y"]), np.arange(4.0) * 2)
    assert got.fields == {"t": 1} and got.channel == "/ticks"


def test_many_waiters_on_one_loop():
    async def main():
        node = tf.Node()
        subs = [node.subscriber(f"/c{i}") for i in range(20)]
        waits = [asyncio.ensure_future(s.recv_async()) for s in subs]
        await asyncio.sleep(0.05)
        for i in reversed(range(20)):
            node.publisher(f"/c{i}").send({"i": i})
        return await asyncio.wait_for(asyncio.gather(*waits), 10)

    got = asyncio.run(main())
    assert [m.fields["i"] for m in got] == list(range(20))


def test_an_async_call_needs_a_running_loop():
    sub = tf.Node().subscriber("/x")
    with pytest.raises(RuntimeError):
        sub.recv_async()


def test_connect_subscribe_and_flush_async():
    async def main():
        server = tf.Node(listen="tcp://127.0.0.1:0")
        client = tf.Node()
        await asyncio.wait_for(client.connect_async(server.address), 10)
        assert client.peers == 1
        sub = await asyncio.wait_for(client.subscribe_async(server.address, "/f"), 10)
        pub = server.publisher("/f")
        await asyncio.wait_for(pub.wait_for_subscribers_async(1), 10)
        await pub.send_async(x=np.ones(1 << 20, np.uint8))
        await asyncio.wait_for(pub.flush_async(), 10)
        got = await asyncio.wait_for(sub.recv_async(), 10)
        with pytest.raises((tf.IoError, tf.PeerLost)):
            await asyncio.wait_for(tf.Node(connect_timeout=0.2).subscribe_async("tcp://127.0.0.1:1", "/f"), 10)
        return got

    got = asyncio.run(main())
    assert got["x"].nbytes == 1 << 20


EXIT_AFTER_ASYNC = """
import asyncio
import numpy as np
import tensorferry as tf

server = tf.Node(listen="tcp://127.0.0.1:0")
server.serve("/echo", lambda m: m)
client = tf.Node()


async def many():
    return await asyncio.gather(
        *(client.request_async(server.address, "/echo", x=np.ones(8)) for _ in range(4))
    )


asyncio.run(many())
print("done", flush=True)
"""


def test_a_process_that_exits_right_after_asyncio_requests_exits_cleanly():
    # The last replies wake the finished loop from the binding's release
    # thread while the interpreter finalizes; that thread must stop taking
    # the GIL first (it aborted the process about one run in twelve).
    import subprocess
    import sys

    for run in range(30):
        done = subprocess.run(
            [sys.executable, "-c", EXIT_AFTER_ASYNC], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0 and done.stdout == "done\n", (run, done.returncode, done.stderr)
