"""FoldQDQ: turn quantize/dequantize-wrapped layers into integer kernels.

Runs in :func:`tvmq.quantize_pipeline`, right after :class:`InsertQDQ` and before
``FoldConstant`` and dead-code elimination; what it leaves goes to WeightOnly (when asked for) and
then to the lowering passes of :func:`tvmq.pipeline.relax_passes` (FoldAffineChains, PackKernels,
FastSoftmax, FastMath).

Rewrites, on any module holding Relax Q/DQ ops (made by :class:`InsertQDQ` or imported from an
ONNX QDQ model):

* ``dequantize(x) -> conv2d/matmul(dequantize(W int8)) [+ bias] [-> relu/relu6/clip]`` into
  ``conv2d/matmul(x_q, W_q, out_dtype=int32) + bias_i32``, where ``bias_i32 = round(b / (sx*sw))
  - zx * sum(W_q)`` folds the activation zero point in, and padding is done explicitly with the
  zero point;
* ``... -> quantize`` after such a kernel into one requantize (fixed-point ``(acc*m0 + 2^(s-1))
  >> s`` or float), whose clamp absorbs relu/relu6/clip; without a quantize the accumulator is
  scaled back to float (the layer still multiplies in integers);
* ``dequantize(a) + dequantize(b) [-> relu] -> quantize`` into an integer add;
* ``quantize(dequantize(q))`` into nothing when the parameters match, or an integer requantize;
* max-pool / reshape / transpose / flatten / squeeze / expand_dims / strided_slice of a
  dequantize into the same op on integers, followed by the dequantize.

A quantize with one scale per channel (and one zero point) becomes the producing layer's
requantize with per-channel multipliers; the layers reading such a tensor take it in integer steps
(a dequantize with scale 1) with the scales folded into their weights by :class:`InsertQDQ`, so
they fold like any other.

Anything that does not match (per-channel dequantized activations, asymmetric weights, unknown
ops) is left as it is, still correct, just not integer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from tvmq.config import RequantizeMode
from tvmq.qparams import QParams, dtype_range, fixed_point_multiplier, int16_accumulates_exactly

from .graph import (
    DEQUANTIZE,
    QUANTIZE,
    FunctionGraph,
    QWeight,
    call_op,
    dims,
    dtype_of,
    evaluate_constant,
    moves_values,
    map_functions,
    rebuild_call,
)
from .layers import find_chains

__all__ = ["FoldQDQ"]

# Activation dtypes folded into integer kernels: 8-bit, and int16 for the layers a plan gives
# 16-bit activations (int8 weights; see :func:`tvmq.qparams.int16_accumulates_exactly`).
ACTIVATION_DTYPES = ("uint8", "int8", "int16")


@dataclass
class _DQ:
    data: relax.Expr  # the integer tensor
    qp: QParams
    scale: relax.Expr
    zero_point: relax.Expr


@dataclass
class _Acc:
    acc: relax.Expr  # int32 accumulator with bias and zero-point correction
    scale: np.ndarray  # real value of one accumulator step, per channel (float64)
    scale32: np.ndarray  # the same as float32 ``sx * sw``, rounded the way ONNX Runtime's kernels round it
    axis: int
    ndim: int
    act: object


def _channel_const(values, axis, ndim, dtype):
    values = np.asarray(values)
    if values.ndim == 1 and np.all(values == values[0]):
        values = values[:1].reshape(())
    if values.ndim == 1:
        shape = [1] * ndim
        shape[axis] = -1
        values = values.reshape(shape)
    return relax.const(values.astype(dtype), dtype)


def _clamp_bounds(qp: QParams, act) -> tuple[int, int]:
    """Integer clamp for an output quantized with ``qp`` after activation ``act``."""
    lo, hi = qp.qmin, qp.qmax
    zp, scale = int(qp.zero_point), float(qp.scale)
    if act is not None:
        if act.lo > -np.inf:
            lo = max(lo, zp + int(np.round(act.lo / scale)))
        if act.hi < np.inf:
            hi = min(hi, zp + int(np.round(act.hi / scale)))
    return lo, max(lo, hi)


def _accumulator_bias(bias, wsum, sx: float, sw: np.ndarray, zx: int) -> np.ndarray | None:
    """The int64 constant a linear layer's int32 accumulator adds: the float ``bias`` (per output
    channel, or None) in accumulator units ``sx * sw``, minus the activation zero point ``zx`` times
    each channel's weight sum ``wsum``; None when it leaves no room in int32 for the products."""
    folded_bias = -zx * wsum
    if bias is not None:
        # an input never seen non-zero in calibration has the tiniest scale: its bias in
        # accumulator units is beyond any integer type (the layer then stays float)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            folded = np.round(bias.astype(np.float64) / (sx * sw))
        if not np.all(np.abs(folded) < 2.0**62):
            return None
        folded_bias = folded_bias + folded.astype(np.int64)
    lo32, hi32 = dtype_range("int32")
    if np.any(folded_bias < lo32 // 2) or np.any(folded_bias > hi32 // 2):
        return None  # a bias this large would not leave room for the products
    return folded_bias


def _float_sum(terms, zp_out):
    """``round(sum_i (x_i - off_i) * r_i + zp_out)`` computed as ONNX Runtime's QLinearAdd computes it.

    The offsets and the output zero point go into one float32 constant ``K = zp_out - sum_i r_i *
    off_i`` and the sum is the chain ``x_0 * r_0 + (x_1 * r_1 + K)``, which LLVM contracts into
    fused multiply-adds as MLAS's kernel does; a sum that is a rounding tie in exact arithmetic
    (frequent when two scales are in a ratio like 1:2) then rounds the same way in both.
    """
    ratios = [np.float32(np.asarray(mult, np.float64).reshape(-1)[0]) for _, _, mult in terms]
    k = np.float32(0)
    for (_, off, _), r in zip(terms, ratios):
        k = np.float32(k + np.float32(r * np.float32(off)))
    total = relax.const(np.float32(np.float32(zp_out) - k), "float32")
    for (x, _, _), r in reversed(list(zip(terms, ratios))):
        total = relax.op.add(relax.op.multiply(relax.op.astype(x, "float32"), relax.const(r, "float32")), total)
    return relax.op.round(total)


@relax.expr_functor.mutator
class _QDQFolder(relax.PyExprMutator):
    def __init__(self, mod, func, mode: RequantizeMode):
        super().__init__(mod)
        self.mode = mode
        self.graph = FunctionGraph(func)
        self.chains = {c.end: c for c in find_chains(self.graph)}
        self.accs: dict = {}
        self.folded = 0

    # ------------------------------------------------------------------ helpers
    def _lookup(self, var):
        try:
            return self.lookup_binding(var)
        except Exception:  # pylint: disable=broad-except
            return None

    def _emit(self, expr):
        return self.builder_.emit(expr)

    def _bind(self, var, expr):
        """Make ``var`` (an original variable) stand for ``expr`` from now on."""
        if isinstance(expr, relax.DataflowVar) and isinstance(var, relax.DataflowVar):
            self.set_var_remap(var, expr)  # no trivial ``a = b`` binding
            return
        if isinstance(var, relax.DataflowVar) or not self.builder_.current_block_is_dataflow():
            new = self.builder_.emit(expr, var.name)
        else:
            new = self.builder_.emit_output(expr, var.name)
        self.set_var_remap(var, new)

    def _const_of(self, expr):
        return evaluate_constant(expr, self._lookup)

    def _dq_of(self, expr) -> _DQ | None:
        seen = 0
        while isinstance(expr, relax.Var) and seen < 64:
            value = self._lookup(expr)
            if not isinstance(value, relax.Var):
                break
            expr, seen = value, seen + 1
        value = self._lookup(expr) if isinstance(expr, relax.Var) else expr
        if call_op(value) != DEQUANTIZE:
            return None
        data, scale_e, zp_e = value.args
        if self._const_of(data) is not None:
            return None  # a constant (weight or bias), not an activation
        scale, zp = self._const_of(scale_e), self._const_of(zp_e)
        dtype = dtype_of(data)
        if scale is None or zp is None or isinstance(scale, QWeight) or dtype not in ACTIVATION_DTYPES:
            return None
        try:
            qp = QParams(scale, zp, dtype, int(value.attrs.axis))
        except ValueError:
            return None
        return _DQ(data, qp, scale_e, zp_e)

    # ------------------------------------------------------------------ requantize
    def _requantize(self, terms, m, zp_out, lo, hi, out_dtype, axis=1, ndim=1):
        """``clamp(round(sum_i (x_i - off_i) * m_i) + zp_out, lo, hi)`` as ``out_dtype``.

        ``terms`` is a list of ``(int tensor, offset, multiplier array)``.
        """
        if self.mode == RequantizeMode.FIXED_POINT:
            largest = max(float(np.max(mult)) for _, _, mult in terms)
            _, shift = fixed_point_multiplier(np.asarray([largest]))
            shift = int(shift[0])
            total = None
            for x, off, mult in terms:
                if len(terms) == 1:
                    m0, shifts = fixed_point_multiplier(np.asarray(mult, np.float64).reshape(-1))
                else:
                    m0 = np.round(np.asarray(mult, np.float64).reshape(-1) * 2.0**shift).astype(np.int64)
                    shifts = np.full_like(m0, shift)
                t = self._emit(relax.op.astype(x, "int64"))
                if off:
                    t = self._emit(relax.op.subtract(t, relax.const(np.int64(off), "int64")))
                t = self._emit(relax.op.multiply(t, _channel_const(m0, axis, ndim, "int64")))
                total = t if total is None else self._emit(relax.op.add(total, t))
            total = self._emit(relax.op.add(total, _channel_const(np.int64(1) << (shifts - 1), axis, ndim, "int64")))
            total = self._emit(relax.op.right_shift(total, _channel_const(shifts, axis, ndim, "int64")))
            if zp_out:
                total = self._emit(relax.op.add(total, relax.const(np.int64(zp_out), "int64")))
        elif len(terms) == 1:
            # ONNX Runtime's arithmetic: float32(acc) * float32 multiplier, round half to even, + zp.
            x, off, mult = terms[0]
            total = self._emit(relax.op.astype(x, "float32"))
            if off:
                total = self._emit(relax.op.subtract(total, relax.const(np.float32(off), "float32")))
            mult = np.asarray(mult, np.float32).reshape(-1)
            total = self._emit(relax.op.multiply(total, _channel_const(mult, axis, ndim, "float32")))
            total = self._emit(relax.op.round(total))
            if zp_out:
                total = self._emit(relax.op.add(total, relax.const(np.float32(zp_out), "float32")))
        else:
            total = self._emit(_float_sum(terms, zp_out))
        total = self._emit(relax.op.clip(total, lo, hi))
        return relax.op.astype(total, out_dtype)

    # ------------------------------------------------------------------ rewrites
    def _fold_linear(self, var, chain) -> bool:
        operands = self._linear_operands(chain)
        if operands is None:
            return False
        dq, w = operands
        channels = chain.out_shape[chain.channel_axis]
        sw = np.broadcast_to(w.scale.astype(np.float64), (channels,))
        sx, zx = float(dq.qp.scale), int(dq.qp.zero_point)
        if dq.qp.dtype == "int16" and not int16_accumulates_exactly(w.q, 0 if chain.kind == "conv2d" else -1):
            return False  # the products could overflow int32: the layer stays float
        weight = relax.const(w.q, "int8")
        if chain.kind == "conv2d":
            acc = self._int_conv2d(chain.call, dq.data, weight, zx)
            wsum = w.q.astype(np.int64).reshape(channels, -1).sum(axis=1)
        else:
            acc = relax.op.matmul(dq.data, weight, out_dtype="int32")
            wsum = w.q.astype(np.int64).sum(axis=0)
        bias = _accumulator_bias(chain.bias, wsum, sx, sw, zx)
        if bias is None:
            return False
        acc = self._emit(acc)
        ndim = len(chain.out_shape)
        if np.any(bias != 0):
            acc = self._emit(relax.op.add(acc, _channel_const(bias, chain.channel_axis, ndim, "int32")))
        scale = sx * sw
        scale32 = np.float32(dq.qp.scale) * np.asarray(sw, np.float32)
        self.accs[var] = _Acc(acc, scale, scale32, chain.channel_axis, ndim, chain.act)
        # Float view for consumers that stay in float; dead code when a quantize follows.
        y = self._emit(relax.op.astype(acc, "float32"))
        y = relax.op.multiply(y, _channel_const(scale, chain.channel_axis, ndim, "float32"))
        if chain.act is not None:
            y = chain.act.apply(self._emit(y))
        self._bind(var, y)
        self.folded += 1
        return True

    def _linear_operands(self, chain) -> tuple[_DQ, QWeight] | None:
        """The dequantized activation and the int8 weight of a conv2d / matmul chain, or None
        when the layer cannot run in integers (per-channel activation, asymmetric weight, weight
        scales along another axis than the output channels)."""
        call = chain.call
        dq = self._dq_of(self.visit_expr(call.args[0]))
        if dq is None or dq.qp.per_channel:
            return None
        w = self._const_of(self.visit_expr(call.args[1]))
        if not isinstance(w, QWeight) or w.q.dtype != np.int8 or np.any(w.zero_point != 0):
            return None
        out_axis = 0 if chain.kind == "conv2d" else w.q.ndim - 1
        if w.scale.ndim == 1 and w.axis != out_axis:
            return None
        if chain.kind == "matmul" and w.q.ndim != 2:
            return None
        return dq, w

    def _int_conv2d(self, call, data, weight, zx: int):
        """``call`` (a float conv2d) on integers, accumulating in int32; padding with the zero
        point ``zx`` is emitted as an explicit pad."""
        attrs = call.attrs
        top, left, bottom, right = (int(p) for p in attrs.padding)
        padding = [top, left, bottom, right]
        if zx != 0 and any(padding):
            # Padding must hold the zero point (real 0), not integer 0.
            layout = str(attrs.data_layout)
            pad_width = [0] * 8
            pad_width[2 * layout.index("H") : 2 * layout.index("H") + 2] = [top, bottom]
            pad_width[2 * layout.index("W") : 2 * layout.index("W") + 2] = [left, right]
            data = self._emit(relax.op.nn.pad(data, pad_width, pad_value=float(zx)))
            padding = [0, 0, 0, 0]
        return relax.op.nn.conv2d(
            data,
            weight,
            strides=attrs.strides,
            padding=padding,
            dilation=attrs.dilation,
            groups=int(attrs.groups),
            data_layout=str(attrs.data_layout),
            kernel_layout=str(attrs.kernel_layout),
            out_layout=str(attrs.out_layout or attrs.data_layout),
            out_dtype="int32",
        )

    def _fold_quantize(self, var, call) -> bool:
        src = call.args[0]
        scale = self._const_of(self.visit_expr(call.args[1]))
        zp = self._const_of(self.visit_expr(call.args[2]))
        out_dtype = str(call.attrs.out_dtype)
        if scale is None or zp is None or isinstance(scale, QWeight) or out_dtype not in ACTIVATION_DTYPES:
            return False
        if np.ndim(scale) != np.ndim(zp) or np.ndim(scale) > 1 or np.ndim(zp) and np.any(zp != zp.reshape(-1)[0]):
            return False
        ndim = len(dims(call.args[0]) or ())
        axis = int(call.attrs.axis) % max(ndim, 1)
        scales = np.asarray(scale, np.float32)  # 0-d, or one per channel along ``axis`` (one zero point)
        per_channel = scales.ndim == 1
        out = QParams(np.float32(1.0) if per_channel else scale, np.asarray(zp).reshape(-1)[0], out_dtype)
        a = self.accs.get(src)
        if a is not None and (not per_channel or a.axis == axis):
            bounds = {_clamp_bounds(QParams(s, out.zero_point, out_dtype), a.act) for s in scales.reshape(-1)}
            if len(bounds) == 1:  # one clamp for every channel (per channel: no relu6)
                lo, hi = bounds.pop()
                m = a.scale / scales.astype(np.float64)
                if self.mode == RequantizeMode.FLOAT:
                    m = a.scale32 / scales
                self._bind(var, self._requantize([(a.acc, 0, m)], m, int(out.zero_point), lo, hi, out_dtype, a.axis, a.ndim))
                return True
        chain = self.chains.get(src)
        if chain is not None and chain.kind == "add" and not per_channel:
            lhs = self._dq_of(self.visit_expr(chain.call.args[0]))
            rhs = self._dq_of(self.visit_expr(chain.call.args[1]))
            if lhs is None or rhs is None or lhs.qp.per_channel or rhs.qp.per_channel:
                return False
            lo, hi = _clamp_bounds(out, chain.act)
            terms = [
                (d.data, int(d.qp.zero_point), np.float64(d.qp.scale) / np.float64(out.scale)) for d in (lhs, rhs)
            ]
            self._bind(var, self._requantize(terms, None, int(out.zero_point), lo, hi, out_dtype))
            self.folded += 1
            return True
        dq = self._dq_of(self.visit_expr(src))
        if dq is None or dq.qp.per_channel:
            return self._quantize_by_multiply(var, src, out, scales, axis, ndim)
        if not per_channel and dq.qp == out:
            self._bind(var, dq.data)
            return True
        m = np.float64(dq.qp.scale) / scales.astype(np.float64)
        term = [(dq.data, int(dq.qp.zero_point), m)]
        self._bind(var, self._requantize(term, m, int(out.zero_point), out.qmin, out.qmax, out_dtype, axis, ndim))
        return True

    def _quantize_by_multiply(self, var, src, out: QParams, scales: np.ndarray, axis: int, ndim: int) -> bool:
        """A float tensor entering the integer domain: ``round(x * (1/s)) + zp``, clamped (``scales``:
        ``s``, or one per channel along ``axis`` of the ``ndim``-d tensor; ``out``: the zero point
        and the dtype).

        ``relax.op.quantize`` divides by the scale; a multiply by the reciprocal is several
        times cheaper and differs only when ``x/s`` lies within an ulp of a rounding tie.
        """
        x = self.visit_expr(src)
        if dtype_of(x) != "float32":
            return False
        t = self._emit(relax.op.multiply(x, _channel_const(1.0 / scales.astype(np.float64), axis, ndim, "float32")))
        t = self._emit(relax.op.round(t))
        if int(out.zero_point):
            t = self._emit(relax.op.add(t, relax.const(np.float32(out.zero_point), "float32")))
        t = self._emit(relax.op.clip(t, out.qmin, out.qmax))
        self._bind(var, relax.op.astype(t, out.dtype))
        return True

    def _push_through(self, var, call) -> bool:
        dq = self._dq_of(self.visit_expr(call.args[0]))
        if dq is None or dq.qp.per_channel:
            return False
        visited = self.visit_expr(call)
        moved = self._emit(rebuild_call(visited, dq.data))
        self._bind(var, relax.op.dequantize(moved, dq.scale, dq.zero_point, axis=-1))
        return True

    def _concat_through(self, var, call) -> bool:
        """``concat(dequantize(a, q), dequantize(b, q), ...)`` -> ``dequantize(concat(a, b, ...), q)``:
        parts with the same scalar parameters are joined as integers."""
        fields = self.visit_expr(call.args[0])
        if isinstance(fields, relax.Var):
            fields = self._lookup(fields)
        if not isinstance(fields, relax.Tuple) or not fields.fields:
            return False
        dqs = [self._dq_of(f) for f in fields.fields]
        if any(d is None or d.qp.per_channel or d.qp != dqs[0].qp for d in dqs):
            return False
        joined = self._emit(relax.op.concat([d.data for d in dqs], axis=int(call.attrs.axis)))
        self._bind(var, relax.op.dequantize(joined, dqs[0].scale, dqs[0].zero_point, axis=-1))
        return True

    def visit_var_binding_(self, binding):
        var, value = binding.var, binding.value
        if isinstance(binding, relax.VarBinding):
            chain = self.chains.get(var)
            if chain is not None and chain.kind != "add" and self._fold_linear(var, chain):
                return
            op = call_op(value)
            if op == QUANTIZE and self._fold_quantize(var, value):
                return
            if moves_values(value) and self._push_through(var, value):
                return
            if op == "relax.concat" and self._concat_through(var, value):
                return
        super().visit_var_binding_(binding)


@tvm.transform.module_pass(opt_level=0, name="FoldQDQ")
class FoldQDQ:
    """Fold quantize/dequantize patterns into integer kernels.

    Parameters
    ----------
    requantize : RequantizeMode or str
        ``"fixed_point"`` (default): int64 multiply and rounding shift, integers only;
        ``"float"``: scale the accumulator in float32 and round half to even, with ONNX Runtime's
        float32 multipliers and operation order (the default for pre-quantized models, which then
        match ONNX Runtime bit for bit).
    """

    def __init__(self, requantize: RequantizeMode | str = RequantizeMode.FIXED_POINT):
        self.requantize = RequantizeMode(requantize)

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        def fold(func):
            if not any(call_op(v) in (QUANTIZE, DEQUANTIZE) for v in FunctionGraph(func).values.values()):
                return None
            return _QDQFolder(mod, func, self.requantize).visit_expr(func)

        return map_functions(mod, fold, remove_unused=True)
