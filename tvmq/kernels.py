"""What the compiled kernels really compute: operand and accumulator dtypes of each reduction.

Used by the tests ("INT8" means int8 operands and int32 accumulation in the lowered TIR, not
just close outputs) and by the build report.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ReductionKernel", "reduction_kernels", "lower"]


@dataclass(frozen=True)
class ReductionKernel:
    """One multiply-accumulate reduction block of a lowered PrimFunc."""

    func: str
    block: str
    operand_dtypes: tuple[str, ...]  # dtypes of the buffers multiplied, before any cast
    accum_dtype: str

    @property
    def is_integer(self) -> bool:
        return self.accum_dtype == "int32" and all(d in ("int8", "uint8") for d in self.operand_dtypes)


def lower(mod, target):
    """Run the Relax pipeline ``tvm.compile`` would run, stopping before codegen.

    The result holds the fused PrimFuncs; ``tvm.compile(lowered, target, relax_pipeline=None)``
    finishes the build without lowering again.
    """
    from tvm import relax

    # tvm.compile uses the unfused generic pipeline for CPUs; the target's own pipeline fuses
    # each conv/matmul with its bias, requantize and activation into one kernel.
    with target:
        return relax.get_default_pipeline(target)(mod)


def reduction_kernels(lowered) -> list[ReductionKernel]:
    """Every reduction block whose update multiplies two buffer loads (conv2d / matmul bodies)."""
    import tvm_ffi
    from tvm import s_tir

    from tvmq._compat import tir

    found = []
    for gv, func in lowered.functions_items():
        if not isinstance(func, tir.PrimFunc):
            continue

        def on_block(block, name=gv.name_hint):
            if not any(int(iv.iter_type) == 2 for iv in block.iter_vars):  # CommReduce
                return
            body = block.body
            if not isinstance(body, tir.BufferStore):
                return
            loads = _multiplied_loads(body.value)
            if len(loads) >= 2:
                found.append(ReductionKernel(name, str(block.name_hint), tuple(loads), str(body.buffer.dtype)))

        tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, on_block)])
    return found


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
