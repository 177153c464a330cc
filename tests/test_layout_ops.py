"""Ops whose TOPI lowering needs a layout of their own survive ConvertToNHWC (ConvTranspose: DB
and U-Net heads), and an op nothing can lower is one clear error."""

import numpy as np
import pytest
import tvm
from conftest import make_model, random_samples, sqnr_db
from onnx import helper
from tvm import relax

from tvmq.cli import main
from tvmq.passes import ConvertToNHWC
from tvmq.runtime import Bundle


def deconv_model(seed=0, k=2, pad=0):
    """conv 4->8 -> relu -> ConvTranspose 8->4 (stride 2, as DB heads upsample; kernel ``k``,
    padding ``pad``) -> relu -> conv 4->4."""
    rng = np.random.default_rng(seed)
    inits = [("w0", rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32)), ("b0", rng.normal(0, 0.1, 8).astype(np.float32)),
             ("wt", rng.normal(0, 0.3, (8, 4, k, k)).astype(np.float32)), ("bt", rng.normal(0, 0.1, 4).astype(np.float32)),
             ("w1", rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("ConvTranspose", ["r0", "wt", "bt"], ["t"], name="up", kernel_shape=[k, k], strides=[2, 2],
                         pads=[pad] * 4),
        helper.make_node("Relu", ["t"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w1"], ["y"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
    ]
    return make_model(nodes, [("x", [1, 4, 8, 8])], [("y", [1, 4, 16, 16])], inits)


def test_convert_to_nhwc_keeps_conv2d_transpose_in_nchw():
    x = relax.Var("x", relax.TensorType((1, 4, 8, 8), "float32"))
    w = relax.const(np.ones((8, 4, 3, 3), np.float32))
    wt = relax.const(np.ones((8, 4, 2, 2), np.float32))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            c = bb.emit(relax.op.nn.conv2d(x, w, padding=1))
            t = bb.emit_output(relax.op.nn.conv2d_transpose(c, wt, strides=2))
        bb.emit_func_output(t)
    out = ConvertToNHWC()(bb.get())
    layouts = {}

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", "").startswith("relax.nn.conv2d"):
            layouts[e.op.name] = str(e.attrs.data_layout)

    relax.analysis.post_order_visit(out["main"], visit)
    assert layouts == {"relax.nn.conv2d": "NHWC", "relax.nn.conv2d_transpose": "NCHW"}


@pytest.mark.parametrize("k, pad, int8_kernels", [(2, 0, 3), (4, 1, 2)])
def test_a_model_with_conv_transpose_compiles_and_stays_accurate(tmp_path, k, pad, int8_kernels):
    """2x2 stride 2 (DB heads) becomes a 1x1 conv + depth-to-space, quantized like any conv; 4x4
    stride 2 pad 1 stays a transposed convolution, in float, NCHW."""
    import onnx

    onnx.save(deconv_model(k=k, pad=pad), tmp_path / "m.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    samples = random_samples([1, 4, 8, 8], n=8, seed=2)
    for i, s in enumerate(samples):
        np.save(calib / f"{i}.npy", s["x"])
    for precision in ("int8", "fp32"):
        assert main(["compile", str(tmp_path / "m.onnx"), "--calib", str(calib), "--precision", precision,
                     "--int8-everywhere", "-o", str(tmp_path / precision)]) == 0
    m = Bundle(tmp_path / "int8").manifest
    assert sum(1 for k in m["kernels"] if k["accumulator"] == "int32") == int8_kernels
    ref = np.concatenate([Bundle(tmp_path / "fp32").run({"x": s["x"]})["y"].ravel() for s in samples])
    got = np.concatenate([Bundle(tmp_path / "int8").run({"x": s["x"]})["y"].ravel() for s in samples])
    assert sqnr_db(ref, got) > 25  # two or three int8 layers


def test_conv_transpose_with_kernel_equal_to_stride_is_a_1x1_conv_and_depth_to_space():
    from tvmq.execute import HostModule
    from tvmq.frontend import load_onnx
    from tvmq.passes import ConvTransposeToConv, count_ops

    mod, _ = load_onnx(deconv_model(k=2))
    mod = relax.transform.FoldConstant()(mod)
    after = ConvTransposeToConv()(mod)
    assert count_ops(mod)["relax.nn.conv2d_transpose"] == 1 and count_ops(after)["relax.nn.conv2d_transpose"] == 0
    assert count_ops(after)["relax.nn.conv2d"] == count_ops(mod)["relax.nn.conv2d"] + 1
    x = random_samples([1, 4, 8, 8], n=1, seed=5)[0]["x"]
    np.testing.assert_allclose(HostModule(after)(x)[0], HostModule(mod)(x)[0], rtol=1e-5, atol=1e-5)
    untouched, _ = load_onnx(deconv_model(k=4, pad=1))
    untouched = relax.transform.FoldConstant()(untouched)
    tvm.ir.assert_structural_equal(ConvTransposeToConv()(untouched), untouched)  # must not touch


def test_an_op_nothing_lowers_is_one_error_line_naming_it(tmp_path, monkeypatch, capsys):
    """Were ConvTranspose converted to NHWC (which TOPI cannot legalize), the build must say so in
    one line, not fail inside VM codegen with an internal error."""
    import onnx

    import tvmq.passes.layout as layout

    monkeypatch.setattr(layout, "DESIRED_LAYOUTS", {"relax.nn.conv2d": ["NHWC", "OHWI"]})
    onnx.save(deconv_model(k=4, pad=1), tmp_path / "m.onnx")  # 2x2 stride 2 would become a 1x1 conv
    assert main(["compile", str(tmp_path / "m.onnx"), "--precision", "fp32", "-o", str(tmp_path / "out")]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and "cannot lower relax.nn.conv2d_transpose (NHWC)" in err[0] and "internal" not in err[0]
    assert not (tmp_path / "out").exists()
