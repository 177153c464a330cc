"""FastMath: sigmoid, tanh, erf and exp as vectorizable polynomials, within stated errors."""

import numpy as np
import pytest
import tvm
from conftest import unary_module
from tvm import relax

from tvmq.execute import HostModule
from tvmq.passes import FastMath, count_ops


def _unary(op, dtype="float32", n=4096):
    return unary_module(op, (n,), dtype)


def _erf(x):
    from math import erf

    return np.vectorize(erf)(x)


@pytest.mark.parametrize("name, op, exact, bound", [
    ("sigmoid", relax.op.sigmoid, lambda x: 1 / (1 + np.exp(-x)), 2e-7),
    ("tanh", relax.op.tanh, np.tanh, 1e-6),
    ("erf", relax.op.erf, _erf, 1e-6),
])
def test_fast_math_ops_are_rewritten_and_within_their_error_bound(name, op, exact, bound):
    mod = _unary(op)
    fast = FastMath()(mod)
    assert count_ops(fast).get(f"relax.{name}", 0) == 0 and count_ops(mod)[f"relax.{name}"] == 1
    x = np.concatenate([np.linspace(-20, 20, 2048), np.random.default_rng(0).normal(0, 3, 2048)]).astype(np.float32)
    got = np.asarray(HostModule(mod)(x), np.float64)  # the pipeline runs FastMath itself
    assert np.abs(got - exact(x.astype(np.float64))).max() < bound


def test_fast_math_leaves_other_dtypes_alone():
    mod = _unary(relax.op.sigmoid, "float16")
    tvm.ir.assert_structural_equal(FastMath()(mod), mod)


def test_sigmoid_is_a_short_rational_polynomial():
    """SiLU (``x * sigmoid(x)``) follows nearly every conv of a YOLO-family detector, so its
    operation count is the epilogue's: the rational form has 24 adds, multiplies, clamps and one
    division (15 vector operations once multiply-adds fuse), where ``1 / (1 + fast_exp(-x))`` had
    27 (21 fused), a floor, a float -> int conversion and a shift."""
    import tvm_ffi
    from tvm import te

    from tvmq._compat import tir
    from tvmq.passes.fast_math import fast_sigmoid

    x = te.placeholder((16,), "float32", name="x")
    func = te.create_prim_func([x, fast_sigmoid(x)])
    kinds = (tir.Add, tir.Sub, tir.Mul, tir.Div, tir.Min, tir.Max, tir.Cast, tir.FloorDiv)
    unique = {}  # the expression is a tree; a repeated subexpression is computed once

    def count(node):
        unique[tvm_ffi.structural_hash(node)] = type(node).__name__

    tvm_ffi.structural_walk(func.body, [(k, count) for k in kinds])
    ops = list(unique.values())
    assert len(ops) <= 24 and ops.count("Div") == 1 and "Cast" not in ops, ops
