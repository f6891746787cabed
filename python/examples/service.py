"""Request and reply: a service that checks its requests against a schema,
answers with tensors, and turns a handler's exception into an error reply.

Run: python service.py
"""

import asyncio

import numpy as np

import tensorferry as tf


def normalize(request: tf.Message):
    x = np.asarray(request["x"])
    if not np.isfinite(x).all():
        raise tf.ServiceError("bad_input", "x holds NaN or infinity")
    scale = request.fields.get("scale", 1.0)
    return {"norm": float(np.linalg.norm(x))}, {"y": x / np.linalg.norm(x) * scale}


server = tf.Node(listen="tcp://127.0.0.1:0", name="normalizer")
server.serve("/normalize", normalize, input=tf.Schema().tensor("x", "f64", "*"))
client = tf.Node(name="client")

reply = client.request(server.address, "/normalize", {"scale": 2.0}, x=np.array([3.0, 4.0]), timeout=5)
print("norm", reply.fields["norm"], "y", np.asarray(reply["y"]))

for bad in (np.array([1.0, np.nan]), np.array([1, 2], np.int32)):
    try:
        client.request(server.address, "/normalize", x=bad, timeout=5)
    except tf.ServiceError as e:
        print(f"refused: {e.code}: {e.message}")


async def many():
    # The asyncio twin: several requests in flight on one event loop.
    xs = [np.random.default_rng(i).standard_normal(8) for i in range(4)]
    replies = await asyncio.gather(*(client.request_async(server.address, "/normalize", x=x) for x in xs))
    return [round(r.fields["norm"], 3) for r in replies]


print("norms", asyncio.run(many()))
