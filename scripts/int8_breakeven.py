"""Where int8 stops paying: int8 vs fp32 time of one layer amid int8 layers, per x86 preset.

For each preset this CPU runs, a chain ``conv 1x1 (16 -> K) -> LAYER -> conv 1x1 (-> 16)``
(hardswish after each, 12x80 pixels) is compiled all-int8 and all-fp32, and LAYER's kernels are
timed the way ``--precision auto`` times layers (its kernel plus the small kernels fusion left
after it, medians on this machine). LAYER is a 1x1 conv of reduction length K (``--k``) to
O channels (``--o``), then depthwise 3x3 and 5x5 convs. Printed: fp32 time / int8 time (above 1:
int8 faster), and the smallest K from which int8 is at least as fast at every O — what
:data:`tvmq.targets.intrinsics.MICRO_KERNELS` records as ``min_reduction`` /
``int8_depthwise`` and the default plan uses to keep slower layers float.

Usage: python scripts/int8_breakeven.py [--presets x86-avx2,x86-avx512,x86-avx512vnni]
         [--k 8,16,32,64,128] [--o 32,64] [--depthwise 32,96,200]
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import numpy as np

TIE = 0.95  # within timing noise of float


def chain_model(k: int, o: int, kernel: int = 1, groups: int = 1, hw=(12, 80), c0: int = 16):
    """ONNX: x[1, c0, H, W] -> conv 1x1 c0->k -> conv kernel x kernel k->o (groups) -> conv 1x1 o->16."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def conv(x, cin, cout, name, ks=1, g=1):
        w = rng.normal(0, 1 / np.sqrt(cin // g * ks * ks), (cout, cin // g, ks, ks)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, name + "_w"))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), name + "_b"))
        nodes.append(helper.make_node("Conv", [x, name + "_w", name + "_b"], [name + "_c"], pads=[ks // 2] * 4, group=g))
        nodes.append(helper.make_node("HardSwish", [name + "_c"], [name]))
        return name

    a = conv("x", c0, k, "first")
    b = conv(a, k, o, "layer", kernel, groups)
    c = conv(b, o, 16, "last")
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c0, *hw])],
                              [helper.make_tensor_value_info(c, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def speedup(preset, model) -> float:
    """fp32 / int8 time of the chain's middle layer."""
    from tvmq.config import QuantConfig
    from tvmq.frontend import load_onnx
    from tvmq.sensitivity import LayerInfo, layer_latency
    from tvmq.quantize import calibrate, prepare

    mod, info = load_onnx(model)
    mod = prepare(mod)
    shape = info.inputs[0].shape
    rng = np.random.default_rng(0)
    samples = [{"x": rng.uniform(-1, 1, shape).astype(np.float32)} for _ in range(2)]
    plan = calibrate(mod, samples, QuantConfig(int8_everywhere=True), target=preset.name, input_names=["x"])
    analysis = SimpleNamespace(layers=[LayerInfo(n, lp.kind, 0, 0) for n, lp in plan.layers.items()], fp16=False)
    layer_latency(mod, plan, analysis, preset)
    layer = [l for l in analysis.layers if l.kind != "add"][1]
    if layer.estimated:
        raise SystemExit(f"{preset.name}: kernels could not be timed here")
    return layer.fp32_ms / layer.int8_ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="x86-avx2,x86-avx512,x86-avx512vnni")
    ap.add_argument("--k", default="8,16,32,64,128", help="reduction lengths of the 1x1 conv")
    ap.add_argument("--o", default="32,64", help="output channels of the 1x1 conv")
    ap.add_argument("--depthwise", default="32,96,200", help="channels of the depthwise convs")
    args = ap.parse_args(argv)
    from tvmq.targets import get_preset, host_cpu_flags

    print(f"fp32 time / int8 time of one layer amid int8 layers (> 1: int8 faster); host ISA: "
          f"{', '.join(sorted(host_cpu_flags() & {'avx2', 'avx512f', 'avx512bw', 'avx512_vnni', 'avx_vnni'}))}")
    ks, os_ = [int(v) for v in args.k.split(",")], [int(v) for v in args.o.split(",")]
    for name in args.presets.split(","):
        preset = get_preset(name)
        if not preset.runs_here:
            print(f"{name}: skipped, this CPU cannot run it")
            continue
        paying = set(ks)
        for o in os_:
            row = {k: speedup(preset, chain_model(k, o)) for k in ks}
            paying &= {k for k, r in row.items() if r >= TIE}
            print(f"{name:<16} 1x1 conv O{o:<4}" + "  ".join(f"K{k} {r:.2f}" for k, r in row.items()), flush=True)
        depthwise = []
        for ks_ in (3, 5):
            row = {c: speedup(preset, chain_model(c, c, ks_, c)) for c in (int(v) for v in args.depthwise.split(","))}
            depthwise += row.values()
            print(f"{name:<16} depthwise {ks_}x{ks_}  " + "  ".join(f"C{c} {r:.2f}" for c, r in row.items()), flush=True)
        start = min((k for k in ks if all(j in paying for j in ks if j >= k)), default=None)
        kernel = preset.micro_kernel
        print(f"{name:<16} int8 pays from K = {start}, depthwise {'yes' if min(depthwise) >= TIE else 'no'} "
              f"(recorded: min_reduction {kernel.min_reduction}, int8_depthwise {kernel.int8_depthwise})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
