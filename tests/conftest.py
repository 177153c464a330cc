"""Shared helpers: small ONNX models made with onnx.helper, and compile-and-run shortcuts."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from onnx import helper

from tvmq.testing import make_model  # noqa: F401  (re-exported to the tests)


def conv_model(cin=4, cout=8, k=3, stride=1, pad=1, groups=1, relu=True, hw=8, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, (cout, cin // groups, k, k)).astype(np.float32)
    b = rng.normal(0, 0.1, cout).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[k, k],
                              pads=[pad] * 4, strides=[stride] * 2, group=groups)]
    out = "c"
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["y"], name="relu"))
        out = "y"
    ho = (hw + 2 * pad - k) // stride + 1
    return make_model(nodes, [("x", [1, cin, hw, hw])], [(out, [1, cout, ho, ho])], [("w", w), ("b", b)]), w, b


def lstm_model(steps=5, batch=1, features=8, hidden=6, direction="bidirectional", layout=0, initial=False, seed=0,
               **attrs):
    from onnx import TensorProto, numpy_helper

    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    inits = [("W", rng.normal(0, 0.4, (dirs, 4 * hidden, features))), ("R", rng.normal(0, 0.4, (dirs, 4 * hidden, hidden))),
             ("B", rng.normal(0, 0.2, (dirs, 8 * hidden)))]
    names = ["x", "W", "R", "B", "", "", ""]
    if initial:
        shape = (dirs, batch, hidden) if layout == 0 else (batch, dirs, hidden)
        inits += [("h0", rng.normal(0, 0.5, shape)), ("c0", rng.normal(0, 0.5, shape))]
        names[5:7] = ["h0", "c0"]
    node = helper.make_node("LSTM", names, ["y", "y_h", "y_c"], name="lstm", hidden_size=hidden, direction=direction,
                            layout=layout, **attrs)
    x_shape = [steps, batch, features] if layout == 0 else [batch, steps, features]
    graph = helper.make_graph([node], "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "y_h", "y_c")],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


def matmul_model(k=32, n=16, batch=1, relu=False, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.2, (k, n)).astype(np.float32)
    b = rng.normal(0, 0.1, n).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), helper.make_node("Add", ["m", "b"], ["a"], name="bias")]
    out = "a"
    if relu:
        nodes.append(helper.make_node("Relu", ["a"], ["y"], name="relu"))
        out = "y"
    return make_model(nodes, [("x", [batch, k])], [(out, [batch, n])], [("w", w), ("b", b)]), w, b


def residual_model(c=8, hw=8, seed=0):
    """conv-relu -> conv ; add(first, second) -> relu -> conv (float output)."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    for i in range(3):
        inits += [(f"w{i}", rng.normal(0, 0.25, (c, c, 3, 3)).astype(np.float32)),
                  (f"b{i}", rng.normal(0, 0.1, c).astype(np.float32))]
    nodes.append(helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", kernel_shape=[3, 3], pads=[1] * 4))
    nodes.append(helper.make_node("Relu", ["c0"], ["r0"], name="relu0"))
    nodes.append(helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4))
    nodes.append(helper.make_node("Add", ["r0", "c1"], ["s"], name="residual"))
    nodes.append(helper.make_node("Relu", ["s"], ["r1"], name="relu1"))
    nodes.append(helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", kernel_shape=[3, 3], pads=[1] * 4))
    return make_model(nodes, [("x", [1, c, hw, hw])], [("y", [1, c, hw, hw])], inits)


def unary_module(op, shape, dtype="float32"):
    """A Relax module ``main(x) = op(x)`` for ``x`` of ``shape`` and ``dtype``."""
    from tvm import relax

    from tvmq._compat import TensorType

    x = relax.Var("x", TensorType(tuple(shape), dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(op(x))
        bb.emit_func_output(y)
    return bb.get()


def random_samples(shape, n=16, seed=1, name="x", low=-1.0, high=1.0):
    rng = np.random.default_rng(seed)
    return [{name: rng.uniform(low, high, shape).astype(np.float32)} for _ in range(n)]


def sqnr_db(ref, test):
    from tvmq.metrics import sample_sqnr

    return sample_sqnr(test, ref)


class Compiled:
    """Float and quantized versions of one ONNX model, compiled for this machine; every layer
    int8 unless ``config`` says otherwise (the numerics of the integer kernels are under test)."""

    def __init__(self, model, samples, config=None, target="x86"):
        from tvmq.config import QuantConfig
        from tvmq.execute import HostModule
        from tvmq.frontend import load_onnx
        from tvmq.quantize import calibrate, prepare, quantize_pipeline

        mod, self.info = load_onnx(model, sample=samples[0])
        self.float_mod = prepare(mod)
        names = [s.name for s in self.info.inputs]
        config = config or QuantConfig(int8_everywhere=True)
        self.plan = calibrate(self.float_mod, samples, config, target=target, input_names=names)
        self.qmod = quantize_pipeline(self.plan)(self.float_mod)
        self.fp32 = HostModule(self.float_mod)
        self.int8 = HostModule(self.qmod)


@pytest.fixture(scope="session")
def demo_dir():
    from tvmq.commands import DEMO_DIR

    return DEMO_DIR


@pytest.fixture(scope="session")
def bundle(tmp_path_factory, demo_dir):
    """The demo compiled for this machine with default settings (read-only: copy it to change it)."""
    from tvmq.cli import main

    out = tmp_path_factory.mktemp("demo-bundle") / "digits"
    assert main(["compile", str(demo_dir / "digits.onnx"), "--calib", str(demo_dir / "digits_calib"), "-o", str(out)]) == 0
    return out


def board_runtime_or_skip(arch: str) -> None:
    """Make sure the TVM runtime for ``arch`` is available. armv7's is built from tvm-ffi's
    source distribution, downloaded from PyPI once: a machine that cannot reach PyPI skips the
    tests that run armv7 code (the download failure itself is tested separately); any other
    failure (the build, the link) fails the test."""
    from tvmq.crossrt import runtime_libraries
    from tvmq.errors import TvmqError

    try:
        runtime_libraries(arch)
    except TvmqError as err:
        if "downloading tvm-ffi's sources" in str(err):
            pytest.skip(f"no network to PyPI for the {arch} runtime's sources: {err}")
        raise


def kernel_instructions(objdump: str, lib, mnemonic: str) -> dict[str, int]:
    """``{function: count of mnemonic}`` for the packed int8 kernels of a library."""
    from tvmq.testing import kernel_instructions as count

    asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True, check=True).stdout
    return count(asm, mnemonic)
