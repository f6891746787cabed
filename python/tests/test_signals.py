"""Ctrl-C interrupts blocking calls (they release the GIL and check signals)."""

import signal
import subprocess
import sys
import time

import pytest

import tensorferry as tf

WAITER = """
import time
node = tf.Node(listen="tcp://127.0.0.1:0")
what = sys.argv[1]
if what == "recv":
    sub = node.subscriber("/never")
    call = lambda: sub.recv()
elif what == "request":
    node.serve("/sleepy", lambda r: time.sleep(60))
    client = tf.Node()
    call = lambda: client.request(node.address, "/sleepy")
elif what == "subscribers":
    pub = node.publisher("/nobody")
    call = lambda: pub.wait_for_subscribers(1)
elif what == "subscribe":
    # Nothing listens there: connecting retries until its timeout.
    client = tf.Node(connect_timeout=60)
    call = lambda: client.subscribe("tcp://127.0.0.1:1", "/x")
elif what == "send":
    node = tf.Node(config={"channels": {"/full": {"queue_depth": 1, "overflow": "block"}}})
    sub = node.subscriber("/full")  # never read
    pub = node.publisher("/full")
    pub.send({"n": 0})  # fills the queue
    call = lambda: pub.send({"n": 1}, x=np.zeros(4))
emit(ready=True)
start = time.monotonic()
try:
    call()
    emit(outcome="returned")
except KeyboardInterrupt:
    emit(outcome="interrupted", after=time.monotonic() - start)
"""


@pytest.mark.parametrize("call", ["recv", "request", "subscribers", "send", "subscribe"])
def test_ctrl_c_interrupts_a_blocking_call(peer, call):
    p = peer(WAITER, call)
    assert p.line()["ready"]
    time.sleep(0.3)  # let it block
    sent = time.monotonic()
    p.proc.send_signal(signal.SIGINT)
    got = p.line(timeout=10)
    assert got["outcome"] == "interrupted"
    assert time.monotonic() - sent < 5
    p.wait()


def test_other_threads_run_while_a_call_waits():
    import threading

    import tensorferry as tf

    sub = tf.Node().subscriber("/never")
    counted = 0
    stop = threading.Event()

    def count():
        nonlocal counted
        while not stop.is_set():
            counted += 1

    t = threading.Thread(target=count)
    t.start()
    with pytest.raises(tf.TimeoutError):
        sub.recv(timeout=0.3)
    stop.set()
    t.join()
    assert counted > 1000


# Garbage in a cycle whose finalizer sleeps, left for the collection the
# interpreter makes as it finalizes: it keeps the interpreter finalizing
# for a second, the window in which a thread taking the GIL back is ended
# where it stands (through this module's frames: an abort).
SLOW_FINALIZATION = """
import gc, threading, time

class SlowToFinalize:
    def __del__(self):
        time.sleep(1.0)

gc.disable()
slow = SlowToFinalize()
slow.me = slow
del slow
"""

# A process whose script ends while a service handler still runs. The
# request comes from another process, so the child has no Python thread of
# its own to wait for.
EXIT_WHILE_HANDLING = SLOW_FINALIZATION + """
started = threading.Event()

def nap(request):
    started.set()
    time.sleep(0.5)
    return {}

node = tf.Node(listen="tcp://127.0.0.1:0")
node.serve("/nap", nap)
emit(address=node.address)
started.wait(30)
emit(exiting=True)
"""


def test_a_process_exits_cleanly_while_a_handler_runs(peer):
    import threading

    p = peer(EXIT_WHILE_HANDLING)
    address = p.line()["address"]
    client = tf.Node()
    asking = threading.Thread(
        target=lambda: _ignore_errors(lambda: client.request(address, "/nap", {}, timeout=10)), daemon=True
    )
    asking.start()
    assert p.line()["exiting"]
    assert p.proc.wait(timeout=30) == 0, p.proc.stderr.read()
    asking.join(timeout=15)


def _ignore_errors(call):
    try:
        call()
    except tf.Error:
        pass  # the reply, or the connection gone with the process: either is fine here


# A thread of the script still waiting in tensorferry when the script ends.
EXIT_WHILE_WAITING = SLOW_FINALIZATION + """
import tensorferry as tf

node = tf.Node(listen="tcp://127.0.0.1:0")
sub = tf.Node().subscribe(node.address, "/quiet")

def wait_forever():
    while True:
        try:
            sub.recv(timeout=None)
        except tf.ClosedError:
            time.sleep(0.01)

threading.Thread(target=wait_forever, daemon=True).start()
time.sleep(0.2)
print("exiting", flush=True)
"""


def test_a_process_exits_cleanly_while_a_thread_waits_in_recv():
    for run in range(3):
        done = subprocess.run(
            [sys.executable, "-c", EXIT_WHILE_WAITING], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0 and done.stdout == "exiting\n", (run, done.returncode, done.stderr)
