"""Denormals flushed to zero on x86: while a call runs, every thread that runs its kernels has
MXCSR's FTZ and DAZ bits set.

x86 CPUs compute with denormal (subnormal) float32 values through a microcode assist, up to a
hundred times slower per operation, and a model whose activations hold many of them slows down
as a whole. PP-OCRv6's small text detector took 51.6 ms in FP32 on an Intel Xeon (2 threads),
11.6 ms flushed, its output equal (ONNX Runtime FP32: 51.8 ms; its ``set_denormal_as_zero``
option is off by default). Flushing changes only values below 1.2e-38 (to zero), as TensorRT and
OpenVINO do by default.

MXCSR is per thread and TVM's thread pool may be started by anyone, so the library does it
itself, whoever loads it (tvmq's runner, the C++ runner, plain TVM): :class:`FlushDenormals`
(after ``CallTIRRewrite``) makes each entry function first call a kernel whose parallel tasks
each set their thread's bits (the calling thread runs task 0 and saves its MXCSR first), and
last a serial one that gives the calling thread its MXCSR back; TVM's worker threads stay
flushed. It costs one parallel launch per call (whose threads then run the first kernel warm):
within noise on models of 0.2 ms and more.
"""

from __future__ import annotations

import tvm
from tvm import relax

__all__ = ["FlushDenormals", "flush_denormals_funcs", "FLUSH_FUNC", "RESTORE_FUNC", "MXCSR_FUNCS", "FTZ_DAZ"]

FLUSH_FUNC = "tvmq_flush_denormals"
RESTORE_FUNC = "tvmq_restore_mxcsr"
MXCSR_FUNCS = (FLUSH_FUNC, RESTORE_FUNC)  # not kernels to time or tune
FTZ_DAZ = 0x8040  # MXCSR bit 15 (flush to zero) and bit 6 (denormals are zero)
_TASKS = 64  # TVM runs a parallel loop as one chunk per thread: every thread gets an iteration


def flush_denormals_funcs(tasks: int = _TASKS):
    """``(flush, restore)`` PrimFuncs over a 1-element int32 buffer: ``flush`` saves the calling
    thread's MXCSR in it (task 0, which TVM runs on the calling thread) and sets FTZ and DAZ in
    every thread; ``restore`` loads the saved value back on the calling thread."""
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def flush(saved: T.Buffer((1,), "int32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for t in T.parallel(tasks):
            csr = T.decl_buffer((1,), "int32", scope="local")
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.sse.stmxcsr", T.address_of(csr[0])))
            if t == 0:
                saved[0] = csr[0]
            csr[0] = T.bitwise_or(csr[0], FTZ_DAZ)
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.sse.ldmxcsr", T.address_of(csr[0])))

    @T.prim_func(private=True)
    def restore(saved: T.Buffer((1,), "int32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.sse.ldmxcsr", T.address_of(saved[0])))

    return flush, restore


@tvm.transform.module_pass(opt_level=0, name="FlushDenormals")
class FlushDenormals:
    """Each public Relax function calls the flush kernel of :func:`flush_denormals_funcs` first
    and the restore kernel last (x86 targets; after ``CallTIRRewrite``, where kernels are called
    directly with their output buffers)."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        entries = [(gv, f) for gv, f in mod.functions_items()
                   if isinstance(f, relax.Function) and f.attrs is not None and "global_symbol" in f.attrs]
        if not entries or any(gv.name_hint == FLUSH_FUNC for gv in mod.get_global_vars()):
            return mod
        builder = relax.BlockBuilder(mod)  # gives the kernels' global variables their types
        flush, restore = (builder.add_func(f.with_attr("global_symbol", name), name)
                          for f, name in zip(flush_denormals_funcs(), (FLUSH_FUNC, RESTORE_FUNC)))
        for gv, func in entries:
            body = func.body
            alloc = builder.normalize(relax.op.builtin.alloc_tensor(relax.ShapeExpr([1]), "int32", 0))
            saved = relax.Var("mxcsr", alloc.ty)
            calls = [builder.normalize(relax.Call(kernel, [saved])) for kernel in (flush, restore)]
            first = relax.BindingBlock([relax.VarBinding(saved, alloc),
                                        relax.VarBinding(relax.Var("flush_denormals", calls[0].ty), calls[0])])
            last = relax.BindingBlock([relax.VarBinding(relax.Var("restore_mxcsr", calls[1].ty), calls[1])])
            body = relax.SeqExpr([first, *body.blocks, last], body.body)
            builder.update_func(gv, relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs, func.span))
        return builder.get()
