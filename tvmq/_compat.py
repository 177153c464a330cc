"""Every TVM name that moved between releases, in one place.

tvmq targets apache-tvm 0.27 (PyPI), where Relax's ``StructInfo`` became ``Type``
(``relax.TensorType``, ``expr.ty``), constants became ``tvm.ir.GenericConst``, TIR became
``tvm.tirx``, and MetaSchedule/DLight/tensor intrinsics moved under ``tvm.s_tir``. Code
elsewhere in tvmq goes through these helpers instead of touching the moved names; the one
exception is TVMScript (``from tvm.script import tirx as T``), whose decorators must be named
where a kernel is written.
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import tvm
from tvm import relax

TensorType = getattr(relax, "TensorType", None) or getattr(relax, "TensorStructInfo")
TupleType = getattr(relax, "TupleType", None) or getattr(relax, "TupleStructInfo")
Constant = getattr(tvm.ir, "GenericConst", None) or getattr(relax, "Constant")
tir = getattr(tvm, "tirx", None) or importlib.import_module("tvm.tir")
# Schedulable TIR (SBlock, TensorIntrin, Schedule) and the arithmetic analyzer (0.27: tvm.sym).
s_tir = importlib.import_module("tvm.s_tir") if importlib.util.find_spec("tvm.s_tir") else tir
arith = getattr(tvm, "sym", None) or importlib.import_module("tvm.arith")
FloatImm, IntImm = tir.FloatImm, tir.IntImm
# 0.27 made BufferLoad a factory function returning tvm.ir.TensorLoad.
BufferLoad = tir.BufferLoad if isinstance(tir.BufferLoad, type) else getattr(tvm.ir, "TensorLoad")


def expr_type(expr):
    """The Relax type (formerly struct info) of an expression."""
    return expr.ty if hasattr(expr, "ty") else expr.struct_info


def ret_type(func):
    """The declared return type of a Relax function (0.27: ``ret_ty``, formerly ``ret_struct_info``)."""
    return func.ret_ty if hasattr(func, "ret_ty") else func.ret_struct_info


def var_name(var) -> str:
    return var.name if hasattr(var, "name") else var.name_hint


def is_constant(expr) -> bool:
    return isinstance(expr, Constant)


def constant_array(const) -> np.ndarray:
    data = const.value if hasattr(const, "value") else const.data
    return data.numpy()


def scalar_arg(expr) -> float:
    """The Python number held by a scalar call argument (FloatImm/IntImm/PrimValue)."""
    value = getattr(expr, "value", expr)
    value = getattr(value, "value", value)
    return float(value)


def make_call(call, args):
    """``call`` with new arguments, same operator and attributes."""
    ty_args = call.ty_args if hasattr(call, "ty_args") else call.sinfo_args
    return relax.Call(call.op, list(args), call.attrs, ty_args)


def meta_schedule():
    return importlib.import_module("tvm.s_tir.meta_schedule")


def dlight():
    return importlib.import_module("tvm.s_tir.dlight")


def cross_compiler(compiler: str):
    from tvm.support import cc

    return cc.cross_compiler(compiler)


def onnx_frontend():
    """The Relax ONNX frontend module (holds ``from_onnx`` and ``ONNXGraphImporter``)."""
    return importlib.import_module("tvm.relax.frontend.onnx.onnx_frontend")


def llvm_host_cpu() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())
