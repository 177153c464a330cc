"""ONNX import: shapes, names, unsupported ops, and the TVM frontend workaround."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import conv_model, make_model
from tvmq.errors import TvmqError
from tvmq.frontend import load_onnx, parse_shape_arg, read_onnx


def paddle_reshape_model():
    """Paddle2ONNX's shape pattern: Shape -> Cast -> Slice -> Cast -> Concat -> Reshape."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT, name="cast1"),
        helper.make_node("Slice", ["sf", "st", "en"], ["sl"], name="slice"),
        helper.make_node("Cast", ["sl"], ["si"], to=TensorProto.INT64, name="cast2"),
        helper.make_node("Concat", ["si", "minus1"], ["shp"], axis=0, name="concat"),
        helper.make_node("Reshape", ["x", "shp"], ["y"], name="reshape"),
    ]
    inits = [("st", np.array([0], np.int64)), ("en", np.array([1], np.int64)), ("minus1", np.array([-1], np.int64))]
    return make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 48])], inits)


def test_tvm_frontend_bug_constant_slice_before_reshape_is_still_there():
    # Upstream symptom the workaround exists for; if this starts passing, the fold can go.
    from tvm.relax.frontend.onnx import from_onnx

    with pytest.raises(Exception, match="Reshape requires the input new shape to be Shape"):
        from_onnx(paddle_reshape_model(), shape_dict={"x": [1, 3, 4, 4]})


def test_constant_shape_subgraph_is_folded_before_import():
    from tvmq.execute import HostModule

    mod, info = load_onnx(paddle_reshape_model())
    x = np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)
    np.testing.assert_array_equal(HostModule(mod)(x)[0], x.reshape(1, 48))
    assert info.outputs[0].shape == (1, 48)


def dynamic_model():
    model, _, _ = conv_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    return model


def test_dynamic_batch_needs_a_shape():
    with pytest.raises(TvmqError, match=r"dynamic shape .*--shape x:1,4,8,8"):
        load_onnx(dynamic_model())
    mod, info = load_onnx(dynamic_model(), shapes={"x": [2, 4, 8, 8]})
    assert info.inputs[0].shape == (2, 4, 8, 8)
    mod, info = load_onnx(dynamic_model(), sample={"x": np.zeros((3, 4, 8, 8), np.float32)})
    assert info.inputs[0].shape == (3, 4, 8, 8)


def test_shape_argument_errors():
    assert parse_shape_arg("input:1,3,48,192") == ("input", [1, 3, 48, 192])
    for bad in ("input", "input:1,x", ":1,2", "input:0,3"):
        with pytest.raises(TvmqError, match="--shape"):
            parse_shape_arg(bad)
    with pytest.raises(TvmqError, match="unknown input"):
        load_onnx(dynamic_model(), shapes={"nope": [1]})
    with pytest.raises(TvmqError, match="conflicts"):
        load_onnx(conv_model()[0], shapes={"x": [1, 4, 9, 9]})


def test_layers_are_named_after_onnx_nodes(demo_dir):
    from tvmq.passes import find_layers
    from tvmq.quantize import prepare

    mod, _ = load_onnx(demo_dir / "digits.onnx", shapes={"input": [1, 1, 8, 8]})
    names = [l.name for l in find_layers(prepare(mod)["main"])]
    assert names == ["conv0", "conv1", "conv2", "fc0", "fc1"]


def test_unsupported_op_is_named_in_the_error():
    node = helper.make_node("Relu", ["x"], ["y"], name="r")
    model = make_model([node], [("x", [1, 4])], [("y", [1, 4])])
    model.graph.node[0].op_type = "FancyOp"
    with pytest.raises(TvmqError, match="cannot read op\\(s\\) FancyOp"):
        load_onnx(model)


def test_unreadable_files(tmp_path):
    with pytest.raises(TvmqError, match="does not exist"):
        read_onnx(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(TvmqError, match="ONNX"):
        read_onnx(junk)


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    model, _, _ = conv_model()
    w = model.graph.initializer[0]
    w.data_location = TensorProto.EXTERNAL
    entry = w.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    w.ClearField("float_data")
    w.ClearField("raw_data")
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(TvmqError, match="outside the model's folder"):
        read_onnx(path)


def test_clip_with_constant_bounds_becomes_relax_clip_and_fuses_as_activation():
    from tvmq.passes import count_ops, find_layers
    from tvmq.quantize import prepare

    model, w, b = conv_model(relu=False)
    model.graph.output[0].name = "y"
    lo = onnx.numpy_helper.from_array(np.array(0.0, np.float32), "lo")
    hi = onnx.numpy_helper.from_array(np.array(6.0, np.float32), "hi")
    model.graph.initializer.extend([lo, hi])
    model.graph.node.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="relu6"))
    mod, _ = load_onnx(model)
    mod = prepare(mod)
    assert count_ops(mod)["relax.clip"] == 1 and "relax.call_tir" not in count_ops(mod)
    act = find_layers(mod["main"])[0].chain.act
    assert (act.kind, act.lo, act.hi) == ("clip", 0.0, 6.0)
