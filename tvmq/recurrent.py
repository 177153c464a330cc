"""ONNX ``LSTM`` as ops TVM imports, over its (static) sequence, before import.

TVM 0.27's Relax ONNX importer has no ``LSTM`` (nor ``GRU``/``RNN``/``Scan``/``Loop``), which
stops every CRNN-style text recogniser. With static shapes the sequence length is known. Each
direction becomes one ``MatMul`` projecting the whole input sequence onto the four gates (a large
matmul tvmq quantizes like any other), then the recurrence:

    g_t = x_t W^T + h_{t-1} R^T + (Wb + Rb);  i, o, f, c = split(g_t)
    C_t = sigmoid(f) * C_{t-1} + sigmoid(i) * tanh(c);  h_t = sigmoid(o) * tanh(C_t)

(ONNX's gate order i, o, f, c.) Where the recurrent weights are small (:data:`LOOP_MAX_BYTES`)
the recurrence is one ``LSTMRecurrence`` node (domain ``ai.tvmq``) that the importer turns into a
loop kernel (:func:`tvmq.targets.recurrence.lstm_recurrence`, one call for the whole sequence);
otherwise it is unrolled, per time step a recurrent ``MatMul`` of the hidden state (int8 where
the plan says), the gate slices, ``Sigmoid``/``Tanh`` and the cell update. Forward, reverse and
bidirectional; ``layout`` 0 and 1; optional initial states. Peepholes, ``clip``,
``input_forget``, non-default activations and per-batch ``sequence_lens`` are refused with one
``error:`` line naming them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tvmq.errors import TvmqError

__all__ = ["decompose_lstm"]


# An LSTM whose recurrent weights (float32, one direction) take at most this many bytes runs
# its recurrence as one loop kernel (tvmq.targets.recurrence); a larger one is unrolled, so that
# its per-step recurrent matmuls can be int8 kernels (a quarter of the weight bytes each step
# streams). Silero VAD (hidden 128: 256 KB) 16 steps: 64 kernel calls -> 1, 34 us for the whole
# recurrence; ddddocr's BiLSTM (hidden 512: 4 MB per direction) stays unrolled.
LOOP_MAX_BYTES = 1 << 20
# A float build has no int8 recurrent matmul to keep unrolled: every LSTM is a loop kernel
# (ddddocr's BiLSTM, hidden 512, FP32: 11.67 -> 11.23 ms, x86 AVX-512, 2 threads)
FLOAT_LOOP_MAX_BYTES = 1 << 62


def _constants(model) -> dict:
    """Initializers and Constant-node tensors of ``model``, by name (numpy)."""
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def _static_shapes(model) -> dict[str, list]:
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model)
    shapes = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


class _Emitter:
    """Appends nodes and initializers with names under one prefix."""

    def __init__(self, model, prefix: str):
        self.model, self.prefix, self.nodes, self.n = model, prefix, [], 0

    def const(self, value: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        name = f"{self.prefix}/{hint}"
        self.model.graph.initializer.append(numpy_helper.from_array(np.array(value, order="C"), name))  # 0-d stays 0-d
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, output: str | None = None, **attrs) -> str:
        from onnx import helper

        name = f"{self.prefix}/{hint}"
        out = output or name
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out


def _attr(node, name, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _refuse(node, what: str):
    raise TvmqError(f"LSTM {node.name or node.output[0]!r}: {what} is not supported; export the LSTM without it")


def decompose_lstm(model, loop_max_bytes: int | None = None) -> int:
    """Replace every ``LSTM`` node of ``model`` (static shapes) in place; return how many.
    ``loop_max_bytes``: the largest recurrent weights (bytes, float32, one direction) run as a
    loop kernel (default :data:`LOOP_MAX_BYTES`; 0: every LSTM unrolled)."""
    loop_max_bytes = LOOP_MAX_BYTES if loop_max_bytes is None else loop_max_bytes
    if not any(n.op_type == "LSTM" for n in model.graph.node):
        return 0
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if opset < 10:
        raise TvmqError(f"LSTM decomposition needs opset >= 10 (Slice with inputs); the model is opset {opset}")
    consts, shapes = _constants(model), _static_shapes(model)
    nodes, count = [], 0
    for node in model.graph.node:
        if node.op_type != "LSTM":
            nodes.append(node)
            continue
        nodes += _lstm(model, node, consts, shapes, loop_max_bytes)
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


@dataclass(frozen=True)
class _LstmSpec:
    """One LSTM node's input names and sizes, checked to be what the decomposition handles."""

    x: str
    w: str
    r: str
    b: str
    init_h: str
    init_c: str
    hidden: int
    direction: str
    layout: int
    dirs: int
    steps: int
    batch: int


def _lstm_spec(node, consts, shapes) -> _LstmSpec:
    inputs = list(node.input) + [""] * (8 - len(node.input))
    x, w, r, b, seq_lens, init_h, init_c, peep = inputs
    hidden = int(_attr(node, "hidden_size", 0))
    direction = _attr(node, "direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    layout = int(_attr(node, "layout", 0))
    if peep:
        _refuse(node, "a peephole input (P)")
    if _attr(node, "clip", None) is not None:
        _refuse(node, "the clip attribute")
    if int(_attr(node, "input_forget", 0)):
        _refuse(node, "input_forget=1")
    acts = [a.decode() if isinstance(a, bytes) else a for a in _attr(node, "activations", [])]
    dirs = 2 if direction == "bidirectional" else 1
    if acts and acts != ["Sigmoid", "Tanh", "Tanh"] * dirs:
        _refuse(node, f"activations {acts}")
    if w not in consts or r not in consts or (b and b not in consts):
        _refuse(node, "a weight (W, R or B) computed at run time")
    shape = shapes.get(x)
    if not shape or len(shape) != 3 or any(d is None for d in shape):
        raise TvmqError(f"LSTM {node.name!r}: the shape of its input {x!r} is not static ({shape}); "
                        "fix the model's input shapes with --shape")
    steps, batch = (shape[0], shape[1]) if layout == 0 else (shape[1], shape[0])
    if seq_lens:
        lens = consts.get(seq_lens)
        if lens is None or np.any(np.asarray(lens) != steps):
            _refuse(node, "sequence_lens other than the full length for every batch entry")
    return _LstmSpec(x, w, r, b, init_h, init_c, hidden, direction, layout, dirs, steps, batch)


def _lstm(model, node, consts, shapes, loop_max_bytes: int):
    s = _lstm_spec(node, consts, shapes)
    hidden = s.hidden
    W, R = consts[s.w].astype(np.float32), consts[s.r].astype(np.float32)
    B = consts[s.b].astype(np.float32) if s.b else np.zeros((s.dirs, 8 * hidden), np.float32)
    e = _Emitter(model, node.name or node.output[0])
    seq = s.x if s.layout == 0 else e.op("Transpose", [s.x], "x_tbi", perm=[1, 0, 2])
    recurrence = _lstm_loop if R[0].nbytes <= loop_max_bytes else _lstm_unrolled
    ys, last_h, last_c = [], [], []
    for d in range(s.dirs):
        name = ("fw", "bw")[d] if s.dirs == 2 else ("bw" if s.direction == "reverse" else "fw")
        bias = B[d, :4 * hidden] + B[d, 4 * hidden:]
        h, c = _initial_state(e, s, d, name, s.init_h, "h"), _initial_state(e, s, d, name, s.init_c, "c")
        y, h, c = recurrence(e, s, name, seq, W[d], R[d], bias, h, c)
        ys.append(y)  # [T, B, H]
        last_h.append(h)  # [1, B, H]
        last_c.append(c)
    _lstm_outputs(e, node, s, ys, last_h, last_c)
    return e.nodes


def _lstm_unrolled(e: _Emitter, s: _LstmSpec, name: str, seq: str, w, r, bias, h: str, c: str):
    """One direction as per-step ops: ``(y [T, B, H], last h, last c [1, B, H])``."""
    hidden = s.hidden
    starts = [e.const(np.array([g * hidden], np.int64), f"{name}/gate{g}_start") for g in range(4)]
    ends = [e.const(np.array([(g + 1) * hidden], np.int64), f"{name}/gate{g}_end") for g in range(4)]
    axis1 = e.const(np.array([1], np.int64), f"{name}/axis1")
    row = e.const(np.array([1, s.batch, hidden], np.int64), f"{name}/row_shape")
    # the whole sequence projected onto the gates at once: [T, B, I] x [I, 4H] (+ both biases)
    proj = e.op("MatMul", [seq, e.const(w.T, f"{name}/W_t")], f"{name}/input_proj")
    proj = e.op("Add", [proj, e.const(bias, f"{name}/bias")], f"{name}/input_bias")
    r_t = e.const(r.T, f"{name}/R_t")
    outs = [None] * s.steps
    for t in (range(s.steps - 1, -1, -1) if name == "bw" else range(s.steps)):
        h, c = _lstm_step(e, f"{name}/t{t}", t, proj, r_t, h, c, (starts, ends, axis1))
        outs[t] = e.op("Reshape", [h, row], f"{name}/t{t}/row")
    y = e.op("Concat", outs, f"{name}/y", axis=0) if s.steps > 1 else outs[0]
    return y, e.op("Reshape", [h, row], f"{name}/h_last"), e.op("Reshape", [c, row], f"{name}/c_last")


def _lstm_loop(e: _Emitter, s: _LstmSpec, name: str, seq: str, w, r, bias, h: str, c: str):
    """One direction as the input projection (a MatMul tvmq quantizes like any other) and one
    ``LSTMRecurrence`` node (domain ``ai.tvmq``), which the importer turns into
    :func:`tvmq.targets.recurrence.lstm_recurrence`. Hidden units are padded to whole chunks
    (zero weights and bias) and sliced off after."""
    from onnx import helper

    from tvmq.targets.recurrence import pack_recurrent_weights, padded_hidden

    hidden = s.hidden
    padded = padded_hidden(hidden)

    def pad_gates(a):  # [..., 4H] -> [..., 4 * padded]: each gate's block padded with zeros
        out = np.zeros((*a.shape[:-1], 4, padded), np.float32)
        out[..., :hidden] = a.reshape(*a.shape[:-1], 4, hidden)
        return out.reshape(*a.shape[:-1], 4 * padded)

    proj = e.op("MatMul", [seq, e.const(pad_gates(w.T), f"{name}/W_t")], f"{name}/input_proj")
    proj = e.op("Add", [proj, e.const(pad_gates(bias), f"{name}/bias")], f"{name}/input_bias")
    if padded > hidden:
        zeros = e.const(np.zeros((s.batch, padded - hidden), np.float32), f"{name}/state_pad")
        h = e.op("Concat", [h, zeros], f"{name}/h0_padded", axis=1)
        c = e.op("Concat", [c, zeros], f"{name}/c0_padded", axis=1)
    p = f"{e.prefix}/{name}/recurrence"
    outs = [f"{p}/y", f"{p}/h", f"{p}/c"]
    e.nodes.append(helper.make_node(
        "LSTMRecurrence", [proj, e.const(pack_recurrent_weights(r), f"{name}/R_packed"), h, c], outs, name=p,
        domain="ai.tvmq", hidden_size=hidden, reverse=int(name == "bw")))
    y, h, c = outs
    if padded > hidden:
        start, end = e.const(np.array([0], np.int64), f"{name}/unpad_start"), e.const(np.array([hidden], np.int64), f"{name}/unpad_end")
        y = e.op("Slice", [y, start, end, e.const(np.array([2], np.int64), f"{name}/axis2")], f"{name}/y_unpadded")
        axis1 = e.const(np.array([1], np.int64), f"{name}/axis1")
        h = e.op("Slice", [h, start, end, axis1], f"{name}/h_unpadded")
        c = e.op("Slice", [c, start, end, axis1], f"{name}/c_unpadded")
    row = e.const(np.array([1, s.batch, hidden], np.int64), f"{name}/row_shape")
    return y, e.op("Reshape", [h, row], f"{name}/h_last"), e.op("Reshape", [c, row], f"{name}/c_last")


def _initial_state(e: _Emitter, s: _LstmSpec, d: int, name: str, given: str, hint: str) -> str:
    """Direction ``d``'s initial h or c: the given state's slice, or zeros."""
    if not given:
        return e.const(np.zeros((s.batch, s.hidden), np.float32), f"{name}/{hint}0")
    index = e.const(np.array(d, np.int64), f"{name}/dir")
    return e.op("Gather", [given, index], f"{name}/{hint}0", axis=0 if s.layout == 0 else 1)


def _lstm_step(e: _Emitter, p: str, t: int, proj: str, r_t: str, h: str, c: str, gates) -> tuple[str, str]:
    """One time step: the next hidden and cell states from the projected input ``proj[t]``."""
    starts, ends, axis1 = gates
    xt = e.op("Gather", [proj, e.const(np.array(t, np.int64), f"{p}/index")], f"{p}/x", axis=0)
    g = e.op("Add", [xt, e.op("MatMul", [h, r_t], f"{p}/recurrent")], f"{p}/gates")
    gate = [e.op("Slice", [g, starts[k], ends[k], axis1], f"{p}/{n}") for k, n in enumerate("iofc")]
    i, o, f = (e.op("Sigmoid", [gate[k]], f"{p}/sigmoid_{n}") for k, n in enumerate("iof"))
    cand = e.op("Tanh", [gate[3]], f"{p}/tanh_c")
    c = e.op("Add", [e.op("Mul", [f, c], f"{p}/keep"), e.op("Mul", [i, cand], f"{p}/write")], f"{p}/cell")
    h = e.op("Mul", [o, e.op("Tanh", [c], f"{p}/tanh_cell")], f"{p}/hidden")
    return h, c


def _lstm_outputs(e: _Emitter, node, s: _LstmSpec, ys: list[str], last_h: list[str], last_c: list[str]) -> None:
    """The node's Y, Y_h and Y_c (those it has) from the per-direction results, in its layout."""
    y_out, h_out, c_out = (list(node.output) + ["", "", ""])[:3]
    if y_out:
        tdbh = e.const(np.array([s.steps, 1, s.batch, s.hidden], np.int64), "y_shape")
        per_dir = [e.op("Reshape", [y, tdbh], f"y{d}") for d, y in enumerate(ys)]
        if s.layout == 0:
            e.op("Concat", per_dir, "y", output=y_out, axis=1)
        else:
            y = e.op("Concat", per_dir, "y_tdbh", axis=1)
            e.op("Transpose", [y], "y", output=y_out, perm=[2, 0, 1, 3])
    for out, parts, hint in ((h_out, last_h, "y_h"), (c_out, last_c, "y_c")):
        if not out:
            continue
        if s.layout == 0:
            e.op("Concat", parts, hint, output=out, axis=0)
        else:
            e.op("Transpose", [e.op("Concat", parts, f"{hint}_dbh", axis=0)], hint, output=out, perm=[1, 0, 2])
