"""Specialize: static copies of ``main`` for chosen sizes of its dynamic dimensions, dispatched in ``main``.

A bundle compiled for a range of sizes (``--dim W=32..1280``) runs one symbolic program. Where a
few sizes matter most (the widths a pipeline pads to, a server's full batch), a static program is
as fast as a bundle compiled for that size alone: its schedules see every extent. This pass keeps
the symbolic program as a private function and adds one static copy per chosen size
(``BindSymbolicVars``); ``main`` becomes a dispatch on the sizes it is called with:

.. code-block:: python

    @R.function
    def main(x: R.Tensor((1, 3, 48, "W"))):
        if R.prim_value(W == 160):
            y = main_W160(R.match_cast(x, R.Tensor((1, 3, 48, 160))))
        else:
            y = main_dynamic(x)
        return R.match_cast(y, R.Tensor((1, (W - 1) // 8 + 1, 6625)))

Every copy is compiled by the same passes as the rest of the module, so a size with a static
copy gives what a static build gives, and every other size what the symbolic program gives.
Runs before legalization (:func:`tvmq.pipeline.lower`), on the quantized module.
"""

from __future__ import annotations

import functools

import tvm
import tvm_ffi
from tvm import relax

from tvmq._compat import expr_type, ret_type, tir, var_name

__all__ = ["Specialize", "variant_name"]


def variant_name(binding: dict[str, int]) -> str:
    """``{"W": 160}`` -> ``main_W160``: the function a static copy is added as."""
    return "main_" + "_".join(f"{name}{value}" for name, value in sorted(binding.items()))


@tvm.transform.module_pass(opt_level=0, name="Specialize")
class Specialize:
    """Static copies of ``main`` for ``variants`` and a dispatch among them in ``main``.

    Parameters
    ----------
    variants : list of dict
        Each ``{symbolic variable name: size}`` (the names ``main``'s signature uses, e.g. ``W``
        or ``H_32`` for a dimension in steps of 32). A variable a variant leaves out stays
        symbolic in that copy. The first variant that matches the call's sizes runs; a call no
        variant matches runs the symbolic program (``main_dynamic``).
    """

    def __init__(self, variants):
        self.variants = [dict(v) for v in variants]

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        if not self.variants:
            return mod
        main = mod["main"]
        symbols = {var.name: var for p in main.params for var in relax.analysis.definable_tir_vars_in_type(expr_type(p))}
        builder = relax.BlockBuilder(mod)  # gives the added functions' GlobalVars their types
        ret = ret_type(main)

        def private(func):
            return func.without_attr("global_symbol")

        generic = builder.add_func(private(relax.utils.copy_with_new_vars(main)), "main_dynamic")
        functions = {generic: builder.get()[generic]}
        branches = []
        for binding in self.variants:
            unknown = sorted(set(binding) - set(symbols))
            if unknown:
                raise ValueError(f"variant {binding}: main has no dynamic dimension {unknown[0]} ({sorted(symbols)})")
            func = private(main.bind_symbolic_vars({symbols[n]: v for n, v in binding.items()}))
            if set(binding) == set(symbols):  # fully static: no dynamic size left to bound
                func = func.without_attr("tir_var_upper_bound")
            gv = builder.add_func(relax.utils.copy_with_new_vars(func), variant_name(binding))
            functions[gv] = func
            cond = functools.reduce(tir.And, [tir.EQ(symbols[n], tir.IntImm("int64", v)) for n, v in binding.items()])
            branches.append((cond, gv))

        params = list(main.params)

        def call(gv):
            callee = functions[gv]
            bindings, args = [], []
            for p, q in zip(params, callee.params):
                if gv.same_as(generic) or tvm_ffi.structural_equal(expr_type(p), expr_type(q)):
                    args.append(p)
                    continue
                v = relax.Var(f"{var_name(p)}_{gv.name_hint}", expr_type(q))
                bindings.append(relax.MatchCast(v, p, expr_type(q)))
                args.append(v)
            value = builder.normalize(relax.Call(gv, args))
            r = relax.Var(f"out_{gv.name_hint}", expr_type(value))
            bindings.append(relax.VarBinding(r, value))
            if tvm_ffi.structural_equal(expr_type(value), ret):
                return relax.SeqExpr([relax.BindingBlock(bindings)], r)
            y = relax.Var("y", ret)  # the static result seen with main's symbolic shape (checked)
            bindings.append(relax.MatchCast(y, r, ret))
            return relax.SeqExpr([relax.BindingBlock(bindings)], y)

        body = call(generic)
        for cond, gv in reversed(branches):
            body = relax.If(cond, call(gv), body)  # 0.27: a PrimExpr is a Relax value
        out = relax.Var("out", ret)
        dispatch = relax.Function(params, relax.SeqExpr([relax.BindingBlock([relax.VarBinding(out, body)])], out),
                                  ret, is_pure=True, attrs=main.attrs).without_attr("tir_var_upper_bound")
        builder.update_func(builder.get().get_global_var("main"), builder.normalize(dispatch))
        return builder.finalize()

