"""Random small ONNX graphs for property-based tests of the passes (hypothesis strategies).

``graphs()`` draws a model from conv2d (plain, grouped, depthwise; strides, padding), matmul,
add, mul, relu, clip, concat, max/avg pooling and reshape, with random shapes, weights and
input ranges; ``check_graph`` compiles it three ways (FP32, the Q/DQ float simulation, the
integer program) and checks the properties tvmq promises. Used by ``tests/test_fuzz.py``
(a fast profile) and ``scripts/fuzz.py`` (the long one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["GraphCase", "graphs", "check_graph", "FuzzResult", "matmul_model", "kernel_asm", "kernel_instructions", "make_model",
           "fp32_and_int8_outputs", "outlier_mlp", "outlier_inputs", "coarse_conv", "mlp"]


@dataclass
class GraphCase:
    model: object  # onnx.ModelProto
    input_shape: tuple[int, ...]
    low: float
    high: float
    description: str
    seed: int


def matmul_model(m: int, k: int, n: int, seed: int = 0):
    """An ONNX model ``y[m, n] = x[m, k] @ W[k, n]`` with fixed normal(0, 0.05) weights: a plain GEMM."""
    import onnx
    from onnx import TensorProto, helper

    w = np.random.default_rng(seed).normal(0, 0.05, (k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [onnx.numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def primfuncs(module, contains: str = "") -> dict:
    """``{name: PrimFunc}`` of ``module``'s kernels whose name contains ``contains``
    (:func:`tvmq.kernels.kernel_funcs`)."""
    from tvmq.kernels import kernel_funcs

    return kernel_funcs(module, contains)


def kernel_asm(func, target) -> str:
    """The assembly of one PrimFunc compiled alone for ``target`` (a ``tvm.target.Target``)."""
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    return (lib.mod if hasattr(lib, "mod") else lib).inspect_source("asm")


def kernel_instructions(asm: str, mnemonic: str, functions: str = r"fused_tvmq_(conv2d|matmul)") -> dict[str, int]:
    """``{kernel: count of mnemonic}`` in a library's disassembly (``objdump -d --no-show-raw-insn``),
    for the kernels whose name matches ``functions`` (default: the packed conv2d/matmul kernels);
    a kernel's code is its compute function and the parallel lambdas outlined from it."""
    import re

    counts, current = {}, None
    for line in asm.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            name = m.group(1).replace("__tvm_ffi_", "").split("_compute_")[0]
            current = name if re.match(functions, name) else None
            if current:
                counts.setdefault(current, 0)
        elif current and re.search(rf"\s{re.escape(mnemonic)}\s", line):
            counts[current] += 1
    return counts


def graphs():
    """A hypothesis strategy of :class:`GraphCase`."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw):
        return _draw_case(draw, st)

    return build()


# What the next op may be, before and after the graph is flattened (conv drawn twice as often).
_SPATIAL_KINDS = ["conv", "conv", "depthwise", "grouped", "relu", "clip", "add", "mul", "concat", "maxpool", "avgpool",
                  "flatten"]
_FLAT_KINDS = ["matmul", "relu", "add_self", "mul_const", "clip"]


def _draw_case(draw, st) -> GraphCase:
    """One random graph: input size, up to five ops (each drawn by its builder), input range."""
    import onnx
    from onnx import TensorProto, helper

    seed = draw(st.integers(0, 2**31 - 1))
    g = _FuzzGraph(draw, st, np.random.default_rng(seed))
    c = draw(st.integers(1, 8))
    h = draw(st.integers(4, 12))
    w = draw(st.integers(4, 12))
    g.shape = [1, c, h, w]
    n_ops = draw(st.integers(1, 5))
    for _ in range(n_ops):
        kind = draw(st.sampled_from(_FLAT_KINDS if g.flat else _SPATIAL_KINDS))
        if g.add(kind):
            g.ops.append(kind)
    if not g.nodes:
        g.cur, _ = g.conv("x", c, 4, 1, 1, 0, 1, [h, w])
        g.shape = [1, 4, h, w]
        g.ops.append("conv")
    out = g.name("out")
    g.emit("Identity", [g.cur], out)
    graph = helper.make_graph(
        g.nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, w])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, g.shape)], initializer=g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    low = draw(st.sampled_from([-scale, 0.0]))
    return GraphCase(model, (1, c, h, w), low, scale, " -> ".join(g.ops), seed)


class _FuzzGraph:
    """The graph being drawn: nodes, initializers, and the current tensor with its shape.

    Each ``_kind`` method appends one op after the current tensor and returns False when the op
    does not fit the current shape (then it is left out of the description).
    """

    def __init__(self, draw, st, rng):
        self.draw, self.st, self.rng = draw, st, rng
        self.nodes, self.inits, self.ops = [], [], []
        self.shape: list[int] = []
        self.cur, self.flat, self.counter = "x", False, 0

    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def const(self, arr) -> str:
        from onnx import numpy_helper

        n = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), n))
        return n

    def emit(self, op: str, inputs: list[str], out: str, **attrs) -> None:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))

    def conv(self, x, cin, cout, k, stride, pad, groups, hw):
        wt = self.rng.normal(0, 1 / np.sqrt(cin // groups * k * k), (cout, cin // groups, k, k))
        b = self.rng.normal(0, 0.1, cout)
        out = self.name("conv")
        self.emit("Conv", [x, self.const(wt), self.const(b)], out, kernel_shape=[k, k], strides=[stride] * 2,
                  pads=[pad] * 4, group=groups)
        return out, [(d + 2 * pad - k) // stride + 1 for d in hw]

    def add(self, kind: str) -> bool:
        if kind in ("conv", "depthwise", "grouped"):
            return self._conv(kind)
        if kind in ("add", "mul", "concat"):
            return self._branch(kind)
        if kind in ("maxpool", "avgpool"):
            return self._pool(kind)
        simple = {"relu": self._relu, "clip": self._clip, "flatten": self._flatten, "matmul": self._matmul,
                  "add_self": self._add_self, "mul_const": self._mul_const}
        return simple[kind]()

    def _conv(self, kind: str) -> bool:
        draw, st, shape = self.draw, self.st, self.shape
        k = draw(st.sampled_from([1, 3, 5]))
        if k > min(shape[2], shape[3]):
            k = 1
        stride = draw(st.sampled_from([1, 1, 2]))
        pad = draw(st.sampled_from([0, k // 2]))
        cin = shape[1]
        if kind == "depthwise":
            groups, cout = cin, cin
        elif kind == "grouped" and cin % 2 == 0 and cin > 1:
            groups, cout = 2, 2 * draw(st.integers(1, 6))
        else:
            groups, cout = 1, draw(st.integers(2, 16))
        hw = [shape[2], shape[3]]
        if any((d + 2 * pad - k) // stride + 1 < 1 for d in hw):
            return False
        self.cur, hw = self.conv(self.cur, cin, cout, k, stride, pad, groups, hw)
        self.shape = [1, cout, *hw]
        return True

    def _relu(self) -> bool:
        out = self.name("relu")
        self.emit("Relu", [self.cur], out)
        self.cur = out
        return True

    def _clip(self) -> bool:
        lo = self.draw(self.st.sampled_from([0.0, -1.0]))
        out = self.name("clip")
        self.emit("Clip", [self.cur, self.const(np.float32(lo)), self.const(np.float32(lo + 6.0))], out)
        self.cur = out
        return True

    def _branch(self, kind: str) -> bool:
        # A branch: a 1x1 conv of the current tensor, combined with it.
        shape = self.shape
        branch, _ = self.conv(self.cur, shape[1], shape[1], 1, 1, 0, 1, [shape[2], shape[3]])
        out = self.name(kind)
        if kind == "concat":
            self.emit("Concat", [self.cur, branch], out, axis=1)
            self.shape = [1, 2 * shape[1], shape[2], shape[3]]
        else:
            self.emit("Add" if kind == "add" else "Mul", [self.cur, branch], out)
        self.cur = out
        return True

    def _pool(self, kind: str) -> bool:
        shape = self.shape
        if shape[2] < 2 or shape[3] < 2:
            return False
        out = self.name(kind)
        op = "MaxPool" if kind == "maxpool" else "AveragePool"
        self.emit(op, [self.cur], out, kernel_shape=[2, 2], strides=[2, 2])
        self.cur, self.shape = out, [1, shape[1], shape[2] // 2, shape[3] // 2]
        return True

    def _flatten(self) -> bool:
        out = self.name("flat")
        self.emit("Flatten", [self.cur], out, axis=1)
        self.cur, self.shape, self.flat = out, [1, int(np.prod(self.shape[1:]))], True
        return True

    def _matmul(self) -> bool:
        n_out = self.draw(self.st.integers(2, 24))
        wt = self.rng.normal(0, 1 / np.sqrt(self.shape[1]), (self.shape[1], n_out))
        out = self.name("mm")
        self.emit("MatMul", [self.cur, self.const(wt)], out)
        out2 = self.name("bias")
        self.emit("Add", [out, self.const(self.rng.normal(0, 0.1, n_out))], out2)
        self.cur, self.shape = out2, [1, n_out]
        return True

    def _add_self(self) -> bool:
        out = self.name("addself")
        self.emit("Add", [self.cur, self.cur], out)
        self.cur = out
        return True

    def _mul_const(self) -> bool:
        out = self.name("mulc")
        self.emit("Mul", [self.cur, self.const(np.float32(0.5))], out)
        self.cur = out
        return True


@dataclass
class FuzzResult:
    sqnr_vs_simulation: float
    sqnr_vs_fp32: float
    max_steps_vs_simulation: float  # |integer - simulation| in units of the output step
    int8_layers: int
    step_bound: float = 1.0  # what max_steps_vs_simulation may reach (see check_graph)


def check_graph(case: GraphCase, n_calib: int = 4) -> FuzzResult:
    """Compile ``case`` as FP32, Q/DQ simulation and integer program; return the agreement.

    Raises if any stage fails. The caller asserts the bounds.
    """
    from tvm import relax

    from tvmq.execute import HostModule
    from tvmq.frontend import load_onnx
    from tvmq.metrics import sample_sqnr
    from tvmq.passes import InsertQDQ
    from tvmq.quantize import calibrate, prepare, quantize_pipeline

    rng = np.random.default_rng(case.seed)
    samples = [{"x": rng.uniform(case.low, case.high, case.input_shape).astype(np.float32)} for _ in range(n_calib)]
    mod, _ = load_onnx(case.model)
    mod = prepare(mod)
    plan = calibrate(mod, samples, input_names=["x"])
    qmod = quantize_pipeline(plan)(mod)
    sim = relax.transform.FoldConstant()(InsertQDQ(plan)(mod))
    fp32, q, s = HostModule(mod), HostModule(qmod), HostModule(sim)
    x = samples[0]["x"]  # calibration data: no clipping, so the simulation is the reference
    ref, out, simulated = fp32(x)[0], q(x)[0], s(x)[0]
    step = max(float(np.abs(simulated).max()) / 127.0, 1e-6)
    return FuzzResult(
        sqnr_vs_simulation=sample_sqnr(out, simulated),
        sqnr_vs_fp32=sample_sqnr(out, ref),
        max_steps_vs_simulation=float(np.abs(out - simulated).max()) / step,
        int8_layers=plan.count("int8"),
        step_bound=1.0 + _float_output_gain(mod, plan) / step,
    )


def _float_output_gain(mod, plan) -> float:
    """How far a layer with a float output can carry its inputs' rounding differences.

    Each int8 tensor of the integer program agrees with the simulation's to one step of its
    scale (the two land on different sides of a rounding tie at most once). A layer whose output
    is not requantized passes those differences on: a conv/matmul by at most
    ``s_in * max_o sum|W[o, :]|``, an add by ``s_a + s_b``; the float ops after it (relu, pooling,
    concat, reshape) do not grow them.
    """
    from tvmq.passes import find_layers

    gain = 0.0
    for layer in find_layers(mod["main"]):
        lp = plan.layers.get(layer.name)
        if lp is None or not lp.is_int8 or lp.output is not None:
            continue
        if layer.weight is not None:
            w = np.abs(np.moveaxis(np.asarray(layer.weight, np.float64), layer.weight_axis, 0))
            gain = max(gain, float(np.max(lp.inputs[0].scale)) * float(w.reshape(w.shape[0], -1).sum(axis=1).max()))
        else:
            gain = max(gain, sum(float(np.max(i.scale)) for i in lp.inputs))
    return gain


# ---------------------------------------------------------------------------- small models for tests and benchmarks
def make_model(nodes, inputs, outputs, inits=(), opset=17, elem_type=None):
    """A checked ONNX model; ``inputs``/``outputs``: (name, shape) of ``elem_type`` (default float32);
    ``inits``: (name, array)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    elem_type = TensorProto.FLOAT if elem_type is None else elem_type
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(n, elem_type, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, elem_type, s) for n, s in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def fp32_and_int8_outputs(model, samples, config, test):
    """``(FP32 output, int8 output)`` of ``model`` quantized with ``config`` on ``samples``, per test input."""
    from tvmq.execute import HostModule
    from tvmq.frontend import load_onnx
    from tvmq.quantize import prepare, quantize

    mod, _ = load_onnx(model)
    ref = HostModule(prepare(mod))
    q = HostModule(quantize(mod, calib_data=samples, config=config, input_names=["x"]))
    outs = [(ref(x)[0], q(x)[0]) for x in test]
    return outs


def outlier_mlp(seed=0):
    """A matmul + bias whose inputs (:func:`outlier_inputs`) have a few huge channels (SmoothQuant's case)."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.1, (64, 32)).astype(np.float32)
    b = rng.normal(0, 0.1, 32).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"), helper.make_node("Add", ["m", "b"], ["y"], name="bias")]
    return make_model(nodes, [("x", [8, 64])], [("y", [8, 32])], [("w", w), ("b", b)])


def outlier_inputs(n, seed):
    rng = np.random.default_rng(seed)
    scale = np.ones(64, np.float32)
    scale[[3, 17, 40]] = 60.0  # a few channels with huge activations, as in transformer layers
    return [(rng.normal(0, 1, (8, 64)) * scale).astype(np.float32) for _ in range(n)]


def coarse_conv(seed=0):
    """Each output channel has one large weight, so the per-channel scale is coarse for the rest."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.02, (16, 32, 3, 3)).astype(np.float32)
    w[np.arange(16), np.arange(16), 1, 1] = 1.0
    b = np.zeros(16, np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1] * 4)
    return make_model([node], [("x", [1, 32, 8, 8])], [("y", [1, 16, 8, 8])], [("w", w), ("b", b)])


def mlp(seed=0, width=256):
    """Two square matmuls with a ReLU between: weight-only quantization's case."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 1 / np.sqrt(width), (width, width)).astype(np.float32)
    w2 = rng.normal(0, 1 / np.sqrt(width), (width, width)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [("x", [4, width])], [("y", [4, width])], [("w1", w1), ("w2", w2)])
