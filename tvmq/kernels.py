"""What the compiled kernels really compute: operand and accumulator dtypes of each reduction.

Used by the tests ("INT8" means int8 operands and int32 accumulation in the lowered TIR, not
just close outputs) and by the build report.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ReductionKernel", "reduction_kernels", "kernel_funcs", "call_order", "time_kernel"]


@dataclass(frozen=True)
class ReductionKernel:
    """One multiply-accumulate reduction block of a lowered PrimFunc."""

    func: str
    block: str
    operand_dtypes: tuple[str, ...]  # dtypes of the buffers multiplied, before any cast
    accum_dtype: str
    intrinsic: str | None = None  # the dot-product instruction a tensorized kernel calls

    @property
    def is_integer(self) -> bool:
        """Integer operands into an int32 accumulator. An int16 operand is an 8-bit activation
        widened before the kernel (x86 ``vpmaddwd`` reads 16-bit values); weights stay int8."""
        return (self.accum_dtype == "int32" and all(d in ("int8", "uint8", "int16") for d in self.operand_dtypes)
                and any(d in ("int8", "uint8") for d in self.operand_dtypes))


def reduction_kernels(lowered) -> list[ReductionKernel]:
    """Every reduction block whose update multiplies two buffer loads (conv2d / matmul bodies)."""
    import tvm_ffi
    from tvmq._compat import s_tir

    from tvmq._compat import tir

    found = []
    for gv, func in lowered.functions_items():
        if not isinstance(func, tir.PrimFunc):
            continue

        def on_block(block, name=gv.name_hint):
            if not any(int(iv.iter_type) == 2 for iv in block.iter_vars):  # CommReduce
                return
            body = block.body
            intrinsic = _dot_intrinsic(body)
            if intrinsic is not None and len(block.match_buffers) >= 3:
                # A tensorized update: operands and accumulator are the intrinsic's buffers.
                dtypes = [str(_match_buffer_dtype(m)) for m in block.match_buffers]
                found.append(ReductionKernel(name, str(block.name_hint), tuple(dtypes[:-1]), dtypes[-1], intrinsic))
                return
            if not isinstance(body, tir.BufferStore):
                return
            loads = _multiplied_loads(body.value)
            if len(loads) >= 2:
                found.append(ReductionKernel(name, str(block.name_hint), tuple(loads), str(body.buffer.dtype)))

        tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, on_block)])
    return found


# The LLVM intrinsics of every int8 micro-kernel (targets/intrinsics.py) and of the CUDA ones.
_DOT_INTRINSICS = ("vpdpbusd", "vpdpwssd", "pmadd", "sdot", "udot", "smmla", "saddlp", "vpadals", "dp4a", "mma", "wmma")


def _dot_intrinsic(stmt) -> str | None:
    """Name of the LLVM dot-product intrinsic a tensorized block body calls, if any."""
    import tvm
    import tvm_ffi
    from tvm.target import codegen

    names = []

    def on_call(call):
        op = getattr(call.op, "name", "")
        if op.endswith("call_llvm_pure_intrin") or op.endswith("call_llvm_intrin"):
            first = call.args[0]
            name = str(codegen.llvm_get_intrinsic_name(int(first.value))) if hasattr(first, "value") else str(first)
            if any(k in name for k in _DOT_INTRINSICS):
                names.append(name)

    tvm_ffi.structural_walk(stmt, [(tvm.ir.Call, on_call)])
    return names[0] if names else None


def _match_buffer_dtype(match):
    buf = match.buffer
    return getattr(buf, "dtype", None) or buf.ty.dtype


def _multiplied_loads(expr) -> list[str]:
    """dtypes of the buffers under the Mul of an ``acc + a * b`` update (casts looked through)."""
    import tvm_ffi

    from tvmq._compat import BufferLoad, tir

    dtypes = []

    def on_mul(mul):
        for operand in (mul.a, mul.b):
            while isinstance(operand, tir.Cast):
                operand = operand.value
            if isinstance(operand, BufferLoad):
                source = operand.buffer if hasattr(operand, "buffer") else operand.source
                dtypes.append(str(source.dtype))

    tvm_ffi.structural_walk(expr, [(tir.Mul, on_mul)])
    return dtypes


def kernel_funcs(module, contains: str = "") -> dict:
    """``{name: PrimFunc}`` of ``module``'s kernels (a fused or lowered IRModule) whose name
    contains ``contains``, in the module's order; not the x86 MXCSR kernels around each call
    (:mod:`tvmq.targets.denormals`): they compute nothing, and the restore one run on random
    data would unmask floating-point exceptions."""
    from tvmq._compat import tir
    from tvmq.targets.denormals import MXCSR_FUNCS

    return {gv.name_hint: f for gv, f in module.functions_items()
            if isinstance(f, tir.PrimFunc) and contains in gv.name_hint and gv.name_hint not in MXCSR_FUNCS}


def call_order(lowered) -> list[str]:
    """Names of the kernels (:func:`kernel_funcs`) ``main`` calls, in call order (a lowered,
    static module)."""
    import tvm
    import tvm_ffi
    from tvm import relax

    names = []
    kernels = set(kernel_funcs(lowered))

    def on_call(call):
        op = call.op
        if isinstance(op, tvm.ir.GlobalVar) and op.name_hint in kernels:
            names.append(op.name_hint)
        for a in call.args:
            if isinstance(a, tvm.ir.GlobalVar) and a.name_hint in kernels:
                names.append(a.name_hint)

    tvm_ffi.structural_walk(lowered["main"], [(relax.Call, on_call)], order="pre")
    return names


def random_argument(rng, shape, dtype):
    """Timing data for a kernel argument: floats in [-1, 1), integers in [-100, 100) clipped to the dtype."""
    import numpy as np

    if np.dtype(dtype).kind == "f":
        return rng.uniform(-1, 1, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -100), min(info.max, 100), shape).astype(dtype)


def time_kernel(func, target, repeat: int = 20) -> float:
    """Milliseconds of one PrimFunc on random inputs (this machine): the best of ``repeat``
    averages of 5 calls. Interference (another process taking a core while the thread pool
    waits at a barrier) only ever adds time, so the minimum is the kernel's own."""
    import numpy as np
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target).jit()
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(random_argument(rng, [int(s) for s in p.shape], str(p.dtype))) for p in func.params]
    timer = lib.time_evaluator("main", tvm.cpu(), number=5, repeat=repeat)
    return float(np.min(timer(*args).results)) * 1e3
