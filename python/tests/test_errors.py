"""Bad input gives Python exceptions that say what was wrong and where."""

import builtins
import json

import numpy as np
import pytest

import tensorferry as tf


def test_malformed_config_raises_config_error_with_line_and_column(tmp_path):
    path = tmp_path / "channels.json"
    path.write_text('{"channels": {\n  "/x": {"queue_depth": 4,}\n}}')
    with pytest.raises(tf.ConfigError) as e:
        tf.Node(config=str(path))
    assert "line 2" in str(e.value) and "column" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_every_invalid_channel_is_reported_with_its_place(tmp_path):
    path = tmp_path / "channels.json"
    path.write_text(
        json.dumps(
            {
                "channels": {
                    "/a": {"device_map": {"cuda:0": "cuda:1", "0": "cuda:2"}},
                    "/b": {"queue_dept": 3},
                }
            }
        )
    )
    with pytest.raises(tf.ConfigError) as e:
        tf.Node(config=path)
    text = str(e.value)
    assert "/a" in text and "cuda:1" in text and "cuda:2" in text
    assert "/b" in text and "queue_dept" in text


def test_a_config_dict_is_checked_the_same_way():
    with pytest.raises(tf.ConfigError) as e:
        tf.Node(config={"channels": {"/x": {"overflow": "sometimes"}}})
    assert "sometimes" in str(e.value)
    node = tf.Node(config={"channels": {"/x": {"queue_depth": 2, "overflow": "drop_oldest"}}})
    sub = node.subscriber("/x")
    pub = node.publisher("/x")
    for i in range(5):
        pub.send({"i": i})
    assert [sub.recv(timeout=1).fields["i"] for _ in range(2)] == [3, 4]
    assert sub.dropped == 3


def test_a_missing_config_file_names_it(tmp_path):
    with pytest.raises(tf.ConfigError) as e:
        tf.Node(config=tmp_path / "nope.json")
    assert "nope.json" in str(e.value)


def test_a_non_tensor_raises_type_error():
    pub = tf.Node().publisher("/x")
    with pytest.raises(TypeError) as e:
        pub.send(x=[1, 2, 3])
    assert "`x`" in str(e.value) and "list" in str(e.value)
    with pytest.raises(TypeError):
        tf.tensor(object())


def test_a_dtype_tensorferry_does_not_carry_is_refused():
    with pytest.raises(tf.InvalidArgument) as e:
        tf.tensor(np.zeros(3, np.complex64))
    assert "bf16" in str(e.value)  # the message lists what is carried


def test_fields_must_be_json():
    pub = tf.Node().publisher("/x")
    with pytest.raises(TypeError) as e:
        pub.send({"a": {"b": object()}})
    assert 'fields["a"]["b"]' in str(e.value)
    with pytest.raises(ValueError):
        pub.send({"a": float("nan")})
    with pytest.raises(TypeError):
        pub.send([1, 2])


def test_duplicate_names_are_refused():
    with pytest.raises(tf.InvalidArgument):
        tf.Node().publisher("/x").send(tensors={"x": np.zeros(1)}, x=np.zeros(1))


def test_malformed_addresses_are_invalid_arguments():
    with pytest.raises(tf.InvalidArgument):
        tf.Node(listen="carrier-pigeon://home")
    with pytest.raises(tf.InvalidArgument):
        tf.Node().subscribe("tcp://", "/x")


def test_a_timeout_is_both_tensorferry_and_builtin():
    sub = tf.Node().subscriber("/quiet")
    with pytest.raises(tf.TimeoutError) as e:
        sub.recv(timeout=0.05)
    assert isinstance(e.value, builtins.TimeoutError) and isinstance(e.value, tf.Error)
    assert "/quiet" in str(e.value)
    with pytest.raises(ValueError):
        sub.recv(timeout=-1)


def test_a_closed_node_raises_closed_error():
    node = tf.Node()
    sub = node.subscriber("/x")
    pub = node.publisher("/x")
    node.close()
    with pytest.raises(tf.ClosedError):
        pub.send(x=np.zeros(1))
    with pytest.raises(tf.ClosedError):
        sub.recv(timeout=1)
    assert list(sub) == []


def test_a_tensor_on_a_device_that_cannot_be_opened_is_refused_with_a_clear_error():
    class OnDevice:
        def __init__(self, kind):
            self.kind = kind

        def __dlpack_device__(self):
            return (self.kind, 0)

        def __dlpack__(self, **kw):
            raise AssertionError("must not be exported")

    # DLPack's kDLOpenCL: never taken, on any machine.
    with pytest.raises(tf.DeviceError) as e:
        tf.tensor(OnDevice(4))
    assert "DLPack device type 4" in str(e.value) and ".cpu()" in str(e.value)
    if tf.devices()["cuda"]["devices"]:
        pytest.skip("cuda:0 is present here: the CUDA tests cover it")
    with pytest.raises(tf.DeviceError) as e:
        tf.tensor(OnDevice(2))
    assert "cuda:0" in str(e.value) and "cannot be opened here" in str(e.value)
