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

__all__ = ["GraphCase", "graphs", "check_graph", "FuzzResult", "matmul_model", "kernel_instructions"]


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
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        seed = draw(st.integers(0, 2**31 - 1))
        rng = np.random.default_rng(seed)
        c = draw(st.integers(1, 8))
        h = draw(st.integers(4, 12))
        w = draw(st.integers(4, 12))
        nodes, inits, ops = [], [], []
        shape = [1, c, h, w]
        cur = "x"
        counter = [0]

        def name(prefix):
            counter[0] += 1
            return f"{prefix}{counter[0]}"

        def const(arr):
            n = name("c")
            inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), n))
            return n

        def conv(x, cin, cout, k, stride, pad, groups, hw):
            wt = rng.normal(0, 1 / np.sqrt(cin // groups * k * k), (cout, cin // groups, k, k))
            b = rng.normal(0, 0.1, cout)
            out = name("conv")
            nodes.append(helper.make_node("Conv", [x, const(wt), const(b)], [out], name=out, kernel_shape=[k, k],
                                          strides=[stride] * 2, pads=[pad] * 4, group=groups))
            return out, [(d + 2 * pad - k) // stride + 1 for d in hw]

        n_ops = draw(st.integers(1, 5))
        flat = False
        for _ in range(n_ops):
            if flat:
                kind = draw(st.sampled_from(["matmul", "relu", "add_self", "mul_const", "clip"]))
            else:
                kind = draw(st.sampled_from(["conv", "conv", "depthwise", "grouped", "relu", "clip", "add", "mul", "concat",
                                             "maxpool", "avgpool", "flatten"]))
            if kind in ("conv", "depthwise", "grouped"):
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
                    continue
                cur, hw = conv(cur, cin, cout, k, stride, pad, groups, hw)
                shape = [1, cout, *hw]
            elif kind == "relu":
                out = name("relu")
                nodes.append(helper.make_node("Relu", [cur], [out], name=out))
                cur = out
            elif kind == "clip":
                lo = draw(st.sampled_from([0.0, -1.0]))
                out = name("clip")
                nodes.append(helper.make_node("Clip", [cur, const(np.float32(lo)), const(np.float32(lo + 6.0))], [out], name=out))
                cur = out
            elif kind in ("add", "mul", "concat"):
                # A branch: a 1x1 conv of the current tensor, combined with it.
                branch, _ = conv(cur, shape[1], shape[1], 1, 1, 0, 1, [shape[2], shape[3]])
                out = name(kind)
                if kind == "concat":
                    nodes.append(helper.make_node("Concat", [cur, branch], [out], name=out, axis=1))
                    shape = [1, 2 * shape[1], shape[2], shape[3]]
                else:
                    nodes.append(helper.make_node("Add" if kind == "add" else "Mul", [cur, branch], [out], name=out))
                cur = out
            elif kind in ("maxpool", "avgpool"):
                if shape[2] < 2 or shape[3] < 2:
                    continue
                out = name(kind)
                op = "MaxPool" if kind == "maxpool" else "AveragePool"
                nodes.append(helper.make_node(op, [cur], [out], name=out, kernel_shape=[2, 2], strides=[2, 2]))
                cur, shape = out, [1, shape[1], shape[2] // 2, shape[3] // 2]
            elif kind == "flatten":
                out = name("flat")
                nodes.append(helper.make_node("Flatten", [cur], [out], name=out, axis=1))
                cur, shape, flat = out, [1, int(np.prod(shape[1:]))], True
            elif kind == "matmul":
                n_out = draw(st.integers(2, 24))
                wt = rng.normal(0, 1 / np.sqrt(shape[1]), (shape[1], n_out))
                out = name("mm")
                nodes.append(helper.make_node("MatMul", [cur, const(wt)], [out], name=out))
                out2 = name("bias")
                nodes.append(helper.make_node("Add", [out, const(rng.normal(0, 0.1, n_out))], [out2], name=out2))
                cur, shape = out2, [1, n_out]
            elif kind == "add_self":
                out = name("addself")
                nodes.append(helper.make_node("Add", [cur, cur], [out], name=out))
                cur = out
            elif kind == "mul_const":
                out = name("mulc")
                nodes.append(helper.make_node("Mul", [cur, const(np.float32(0.5))], [out], name=out))
                cur = out
            ops.append(kind)
        if not nodes:
            cur, _ = conv("x", c, 4, 1, 1, 0, 1, [h, w])
            shape = [1, 4, h, w]
            ops.append("conv")
        out = name("out")
        nodes.append(helper.make_node("Identity", [cur], [out], name=out))
        graph = helper.make_graph(
            nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, w])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)], initializer=inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
        low = draw(st.sampled_from([-scale, 0.0]))
        return GraphCase(model, (1, c, h, w), low, scale, " -> ".join(ops), seed)

    return build()


@dataclass
class FuzzResult:
    sqnr_vs_simulation: float
    sqnr_vs_fp32: float
    max_steps_vs_simulation: float  # |integer - simulation| in units of the output step
    int8_layers: int
    step_bound: float = 1.0  # what max_steps_vs_simulation may reach (see check_graph)


def _sqnr(ref, test) -> float:
    noise = float(np.sum((np.asarray(test, np.float64) - ref) ** 2))
    signal = float(np.sum(np.asarray(ref, np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)


def check_graph(case: GraphCase, n_calib: int = 4) -> FuzzResult:
    """Compile ``case`` as FP32, Q/DQ simulation and integer program; return the agreement.

    Raises if any stage fails. The caller asserts the bounds.
    """
    from tvm import relax

    from tvmq.execute import HostModule
    from tvmq.frontend import load_onnx
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
        sqnr_vs_simulation=_sqnr(simulated, out),
        sqnr_vs_fp32=_sqnr(ref, out),
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
            gain = max(gain, float(lp.inputs[0].scale) * float(w.reshape(w.shape[0], -1).sum(axis=1).max()))
        else:
            gain = max(gain, sum(float(i.scale) for i in lp.inputs))
    return gain
