"""tvmq's compilation pipeline: Relax module -> scheduled, lowered module -> executable.

Where it sits: frontend -> calibrate -> plan -> passes -> **pipeline** (lowering, schedules, build) -> bundle.

It is TVM's CPU pipeline (``relax.backend.cpu_generic``) with these additions, per target
preset: packed int8 dot-product kernels (:class:`tvmq.passes.PackKernels`) before legalization,
convs that write the padded input of the conv after them
(:class:`tvmq.targets.padded_outputs.WritePaddedOutputs`) after
fusion, kernels from a MetaSchedule tuning database when one is given, and tvmq's default
schedule rules for every kernel the database does not cover. ``tvm.compile``'s own CPU path
neither fuses nor schedules.
"""

from __future__ import annotations

import tvm
from tvm import relax

from tvmq.targets import get_preset

__all__ = ["relax_passes", "fuse", "lower", "build", "schedule_rules", "dot_intrinsics", "unlowered_ops",
           "compile_lowered"]


def schedule_rules(preset):
    """The default schedule rules for ``preset``."""
    from tvmq.targets.schedules import default_rules

    preset = get_preset(preset)
    if preset.kind != "llvm":
        return []
    return default_rules(dot_intrinsics(preset), lanes=preset.vector_lanes, registers=preset.vector_registers)


def dot_intrinsics(preset) -> dict[int, str] | None:
    """``{lanes: tensor intrinsic}`` for the preset's int8 micro-kernel (registered on demand),
    and ``{("int16", lanes): tensor intrinsic}`` for its kernel of 16-bit activations, if any."""
    from tvmq.targets import intrinsics

    kernel = get_preset(preset).micro_kernel
    if kernel is None:
        return None
    intrinsics.register()
    kernels = [kernel] + ([intrinsics.MICRO_KERNELS[kernel.fallback]] if kernel.fallback else [])
    found = {lanes: intrinsics.intrinsic_name(kern.name, lanes) for kern in kernels for lanes in kern.lanes}
    if kernel.wide:  # layers with 16-bit activations: ("int16", lanes)
        found.update({("int16", lanes): intrinsics.intrinsic_name(kernel.wide, lanes)
                      for lanes in intrinsics.MICRO_KERNELS[kernel.wide].lanes})
    return found


def relax_passes(preset) -> list:
    """Graph-level passes that depend on the target (run before legalization)."""
    from tvmq.passes import FastMath, FastSoftmax, FoldAffineChains, PackKernels, SeparableMaxPool, SplitToSlices

    preset = get_preset(preset)
    if preset.kind != "llvm":
        return []
    from tvmq.targets.intrinsics import MICRO_KERNELS

    kernel, pairs = preset.micro_kernel, None
    if kernel is not None and kernel.pixels == 2:  # two-pixel kernel, one-pixel fallback
        kernel, pairs = MICRO_KERNELS[kernel.fallback], (kernel.lanes[0], kernel.k)
    lanes, k, operand = (kernel.lanes, kernel.k, kernel.operand_dtype) if kernel is not None else ((), 4, None)
    wide = MICRO_KERNELS[kernel.wide].lanes if kernel is not None and kernel.wide else ()
    return [SeparableMaxPool(),
            SplitToSlices(),
            FoldAffineChains(),
            PackKernels(preset.activation_dtype, lanes, float_lanes=preset.vector_lanes, k=k, operand_dtype=operand,
                        pairs=pairs, pixel_tile=_pixel_tile(preset), wide_lanes=wide),
            FastSoftmax(preset.vector_lanes),
            FastMath(integer_conversions=preset.is_host)]  # x86: lrint is one vcvtps2dq


# The pixels a kernel over a symbolic width rounds its width up to on 512-bit vector ISAs: the
# crop wastes up to this many minus one columns per row, which a short line feels. PP-OCRv4 rec,
# dynamic/static in one run (VNNI host, 2 threads) at widths 48 / 96 / 160 / 320 / 1280: the full
# register tile (6 to 12 pixels) 1.30 / 1.20 / 1.12 / 1.08 / 1.08x; at most 4 pixels 1.19 / 1.20 /
# 1.11 / 1.05 / 1.08x. With 16 registers (AVX2) the tile for 4 pixels shrinks to 2 x 2 and lost
# at large widths (1.10 -> 1.38x at 1280, x86-avx2 build on the same host): there, and on the
# ISAs not measured, the full tile.
SYMBOLIC_PIXELS = 4


def _pixel_tile(preset):
    """``(channel blocks, lanes, pixels) -> multiple`` an int8 kernel computes its pixels to
    (cropped after). For a symbolic extent (``pixels=None``) the register tile tvmq's schedule
    picks: for an extent of :data:`SYMBOLIC_PIXELS` with 512-bit vectors, for any extent
    otherwise; for a static one, 1 or a few spare pixels (``PackedKernelRule.padded_pixels``)."""
    from tvmq.targets.schedules import PackedKernelRule

    rule = PackedKernelRule(registers=preset.vector_registers, vector_lanes=preset.vector_lanes)
    extent = SYMBOLIC_PIXELS if preset.vector_lanes >= 16 else None

    def multiple(blocks, lanes, pixels=None):
        if pixels is not None:
            return rule.padded_pixels(pixels, blocks, lanes)
        return rule.tile(extent, blocks, lanes, dot=True)[0]

    return multiple


def _fuse_passes(preset) -> list:
    from tvmq.targets.padded_outputs import WritePaddedOutputs

    return [
        *relax_passes(preset),
        # one kernel for identical calls: two 3x3 convs reading one tensor each padded it (9 of
        # YOLOX's 44 pads were such twins, and a twin kept its pad from fusing with the next
        # one): 157 -> 139 kernels, all-int8 10.13 -> 10.07 ms (alternated, VNNI host, 2 threads)
        relax.transform.EliminateCommonSubexpr(),
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps({"relax.reshape": _legalize_reshape}),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        *([WritePaddedOutputs()] if get_preset(preset).kind == "llvm" else []),  # a conv writes the next one's pad
    ]


def _legalize_reshape(bb, call):
    """A reshape of a dynamic shape stays a Relax reshape (the VM runs it as a view of the same
    data). TOPI's reshape kernel indexes it with a division and a modulo by the symbolic extent per
    element, which TVM 0.27's RewriteDataflowReshape cannot prove a reshape and keeps as a copy:
    five such copies took 0.2 ms of PP-OCRv4 rec's 6 ms at width 320 (none in the static build)."""
    from tvmq.passes.graph import static_shape

    if static_shape(call) is None or static_shape(call.args[0]) is None:
        return call
    return tvm.ir.Op.get("relax.reshape").get_attr("FLegalize")(bb, call)


def fuse(mod: tvm.IRModule, preset) -> tvm.IRModule:
    """Legalize and fuse: the module whose PrimFuncs are the kernels to schedule (or tune)."""
    preset = get_preset(preset)
    with preset.tvm_target():
        return tvm.transform.Sequential(_fuse_passes(preset), name="tvmq.fuse")(mod)


def _lower_gpu(mod: tvm.IRModule, target) -> tvm.IRModule:
    """TVM's CUDA pipeline, with DLight's Matmul rule not tensorizing 8-bit kernels (TVM 0.27
    aborts the build of an int8 matmul it tensorizes; see ``NoInt8TensorCores``)."""
    from tvm.relax.backend.cuda import pipeline as cuda

    from tvmq._compat import dlight
    from tvmq.targets.generic_schedules import NoInt8TensorCores

    dl = dlight()

    schedule = dl.ApplyDefaultSchedule(NoInt8TensorCores(dl.gpu.Matmul()), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                       dl.gpu.GeneralReduction(), dl.gpu.Fallback())
    legalize = cuda.legalize_passes(target)[:-1] + [schedule]  # its last pass is DLight's default schedule
    with target:
        return tvm.transform.Sequential(cuda.library_dispatch_passes(target) + legalize + cuda.dataflow_lower_passes(target)
                                        + cuda.finalize_passes(target), name="tvmq.lower_gpu")(mod)


def lower(mod: tvm.IRModule, preset, database=None) -> tvm.IRModule:
    """Legalize, fuse, schedule and lower ``mod`` for ``preset`` (stops before codegen).

    ``database`` (from :func:`tvmq.tune.load_database`) supplies tuned kernels; every other
    kernel gets tvmq's default schedule.
    """
    preset = get_preset(preset)
    target = preset.tvm_target()
    if preset.kind != "llvm":
        from tvmq.passes import UnrollLSTM

        return _lower_gpu(UnrollLSTM()(mod), target)  # the LSTM loop kernel is a CPU kernel
    from tvmq._compat import dlight

    passes = list(_fuse_passes(preset))
    if database is not None:
        with target:  # the pass captures the current target when it is made
            passes.append(relax.transform.MetaScheduleApplyDatabase(enable_warning=False))
    from tvmq.targets.denormals import FlushDenormals
    from tvmq.targets.parallel import SerialWhenSmall
    from tvmq.targets.shared_values import ShareSymbolicValues
    from tvmq.targets.tails import VersionVectorTails

    passes += [
        dlight().ApplyDefaultSchedule(*schedule_rules(preset)),
        VersionVectorTails(),  # predicated vector loops: a clean vector body where every lane is inside
        SerialWhenSmall(),  # parallel loops over a dynamic extent: threads only when the call is big enough
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        *([FlushDenormals()] if preset.is_host else []),  # FTZ/DAZ on every thread first thing
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        ShareSymbolicValues(),  # each symbolic size and shape built once per call, not per kernel
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]
    seq = tvm.transform.Sequential(passes, name="tvmq.lower")
    if database is not None:
        with target, database:
            return seq(mod)
    with target:
        return seq(mod)


def build(mod: tvm.IRModule, preset, database=None):
    """Lower and compile; returns a ``tvm.runtime.Executable``."""
    preset = get_preset(preset)
    return compile_lowered(lower(mod, preset, database), preset)


def compile_lowered(lowered: tvm.IRModule, preset):
    """Code generation of a module :func:`lower` made; an operator nothing lowered is a
    :class:`~tvmq.errors.TvmqError` naming it (TVM's VM codegen only says that one exists)."""
    preset = get_preset(preset)
    target = preset.tvm_target()
    try:
        with target:  # nvcc takes the CUDA arch from the current target
            return tvm.compile(lowered, target, relax_pipeline=None)
    except Exception as err:
        if "CodeGenVM cannot emit" not in str(err):
            raise
        from tvmq.errors import TvmqError

        ops = sorted(unlowered_ops(lowered))
        raise TvmqError(f"TVM cannot lower {', '.join(ops) or 'an operator'} for target {preset.name!r} "
                        "(no TOPI/legalization for it in this layout or dtype); keep the layer out of the graph "
                        "or report it with the model") from None


def unlowered_ops(lowered: tvm.IRModule) -> set[str]:
    """High-level Relax operators left in a lowered module (what VM codegen cannot emit), with
    their data layout where they have one."""
    found = set()
    skip = ("relax.call_tir", "relax.call_packed", "relax.call_pure_packed", "relax.call_builtin_with_ctx",
            "relax.null_value", "relax.shape_of", "relax.tensor_", "relax.vm.", "relax.builtin.", "relax.memory.")

    def visit(expr):
        name = getattr(getattr(expr, "op", None), "name", "") if isinstance(expr, relax.Call) else ""
        if name.startswith("relax.") and not name.startswith(skip):
            layout = getattr(expr.attrs, "data_layout", None) if expr.attrs is not None else None
            found.add(f"{name} ({layout})" if layout else name)

    for _, func in lowered.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found
