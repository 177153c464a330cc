"""An LSTM's recurrence as one CPU kernel that loops over time.

Unrolled into per-step ops (:mod:`tvmq.recurrent`), every time step of an LSTM is a ``take`` of
its projected input, the recurrent ``h @ R^T`` and two elementwise kernels, each a VM call with
its own tensors: Silero VAD's 16-step LSTM (hidden 128) was 64 kernel calls and ~300 VM
instructions for a few microseconds of arithmetic per step. :func:`lstm_recurrence` computes the
whole sequence in one call: per step, per chunk of ``chunk`` hidden units, the four gates'
``chunk``-wide accumulators start from the projected input, take ``h[k] * R^T[k]`` for every
``k`` (the recurrent weights packed chunk by chunk: ``[chunks, H, 4, chunk]``, contiguous in the
``k`` loop), then the cell update in vectors. The hidden state is double-buffered (step ``s``
reads one half and writes the other), so the chunks of a step are independent and may run in
parallel.

In parallel, each thread takes one contiguous range of chunks every step (the thread count is
asked of the runtime at each call), forwards on even steps and backwards on odd ones. A range's
weights about the size of the core's L2 (ddddocr's BiLSTM, hidden 512: 2 MB per thread of 2)
read in the same order every step miss on every line (the least recently used line is always
the next one read); backwards, a step starts on the lines the previous one ended with, still in
L2. That kernel, 31 steps, x86 AVX-512 (2 MB L2 per core), 2 threads: 1.13 -> 0.72 ms; 1 thread
(4 MB a step): 4.3 -> 2.9 ms. Chunks handed to threads by TVM's own split of a parallel loop
would not do it: on odd steps each thread would take other chunks than on even ones.

The hidden size is padded to whole chunks (``padded``): the padded units' projected gates are 0
(their weights and bias are zero), so their cell and hidden states stay 0 and they never enter
a real unit's gates (the ``k`` loop covers the real units only).
"""

from __future__ import annotations

__all__ = ["CHUNK", "LSTM_ATTR", "lstm_recurrence", "pack_recurrent_weights", "padded_hidden"]

CHUNK = 16  # hidden units per accumulator tile: 4 gates x 16 float32 lanes
LSTM_ATTR = "tvmq.lstm"  # the kernel's attribute: {"hidden": H, "reverse": 0|1}
# A step's chunks run in parallel (one parallel launch per step) where its recurrent weights take
# more than this: a core's cache share no longer holds them (Silero's 256 KB: serial)
_PARALLEL_BYTES = 256 << 10


def padded_hidden(hidden: int, chunk: int = CHUNK) -> int:
    """The hidden size the kernel computes: ``hidden`` rounded up to whole chunks."""
    return -(-hidden // chunk) * chunk


def pack_recurrent_weights(r, chunk: int = CHUNK):
    """ONNX's ``R`` of one direction (``[4H, H]``, gates i, o, f, c) as the kernel reads it:
    ``[chunks, H, 4, chunk]`` with ``out[n, k, g, l] = R[g*H + n*chunk + l, k]`` (0 past ``H``)."""
    import numpy as np

    hidden = r.shape[1]
    padded = padded_hidden(hidden, chunk)
    gates = np.zeros((4, padded, hidden), np.float32)
    gates[:, :hidden] = r.reshape(4, hidden, hidden)
    return np.ascontiguousarray(gates.reshape(4, padded // chunk, chunk, hidden).transpose(1, 3, 0, 2))


def lstm_recurrence(steps: int, batch: int, hidden: int, reverse: bool = False, parallel: bool | None = None,
                    chunk: int = CHUNK):
    """A scheduled PrimFunc ``(proj, r_packed, h0, c0) -> (y, h_last, c_last)``.

    ``proj [steps, batch, 4 * padded]``: the input projected onto the gates (bias included), gate
    blocks of ``padded`` units (``hidden`` rounded up to ``chunk``); ``r_packed``:
    :func:`pack_recurrent_weights`; ``h0``, ``c0``, ``h_last``, ``c_last``: ``[batch, padded]``;
    ``y [steps, batch, padded]``: the hidden state after each step, in time order (``reverse``
    runs the steps from the last). ``parallel``: the chunks of each step in parallel (one
    parallel launch per step: worth it where a step's weights are large; default: where they take
    more than 256 KB).
    """
    from tvm.script import tirx as T

    from tvmq.passes.fast_math import logistic, tanh

    padded = padded_hidden(hidden, chunk)
    chunks = padded // chunk
    if parallel is None:
        parallel = 4 * hidden * hidden * 4 > _PARALLEL_BYTES  # float32 [4H, H]
    last = steps % 2
    attr = {"hidden": hidden, "reverse": int(bool(reverse))}

    def time(s):
        return steps - 1 - s if reverse else s

    loop = T.parallel if parallel else T.serial

    def unit(p, i, s, per):
        """The chunk thread ``p`` computes ``i``-th in step ``s`` (see the module docstring)."""
        if not parallel:
            return i
        return p * per + T.if_then_else(s % 2 == 1, T.min(per, chunks - p * per) - 1 - i, i)

    @T.prim_func(private=True, s_tir=True)
    def tvmq_lstm(proj: T.Buffer((steps, batch, 4 * padded), "float32"),
                  r: T.Buffer((chunks, hidden, 4, chunk), "float32"),
                  h0: T.Buffer((batch, padded), "float32"), c0: T.Buffer((batch, padded), "float32"),
                  y: T.Buffer((steps, batch, padded), "float32"),
                  h_last: T.Buffer((batch, padded), "float32"), c_last: T.Buffer((batch, padded), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, LSTM_ATTR: attr})
        with T.sblock("root"):
            state = T.sblock_alloc_buffer((2, batch, padded), "float32")  # h, double-buffered
            # threads: one range of chunks each (the last may be short)
            threads = T.min(T.max(T.call_packed("runtime.NumThreads"), 1), chunks) if parallel else 1
            per = (chunks + threads - 1) // threads
            for b, j in T.grid(batch, padded):
                state[0, b, j] = h0[b, j]
                c_last[b, j] = c0[b, j]
            for s in range(steps):
                for b in range(batch):
                    for p in loop(threads):
                        for i in range(per):
                            if p * per + i < chunks:
                                with T.sblock("gates"):
                                    n = T.meta_var(unit(p, i, s, per))
                                    # the four gates' accumulators: a local tile LLVM keeps in registers
                                    acc = T.sblock_alloc_buffer((4, chunk), "float32", scope="local")
                                    for g in T.unroll(4):
                                        for l in T.vectorized(chunk):
                                            acc[g, l] = proj[time(s), b, g * padded + n * chunk + l]
                                    for k in range(hidden):
                                        for g in T.unroll(4):
                                            for l in T.vectorized(chunk):
                                                acc[g, l] = acc[g, l] + state[s % 2, b, k] * r[n, k, g, l]
                                    for l in T.vectorized(chunk):
                                        c_last[b, n * chunk + l] = (logistic(acc[2, l]) * c_last[b, n * chunk + l]
                                                                    + logistic(acc[0, l]) * tanh(acc[3, l]))
                                        state[(s + 1) % 2, b, n * chunk + l] = (logistic(acc[1, l])
                                                                                * tanh(c_last[b, n * chunk + l]))
                                        y[time(s), b, n * chunk + l] = state[(s + 1) % 2, b, n * chunk + l]
            for b, j in T.grid(batch, padded):
                h_last[b, j] = state[last, b, j]

    return tvmq_lstm
