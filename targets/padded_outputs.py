"""WritePaddedOutputs: a conv kernel writes its output straight into the padded tensor the next
conv reads.

A 3x3 conv reads its input padded (with the zero point in int8), and the pad was a kernel of
its own between the two convs: FuseOps does not fuse a pad (an injective op whose indices are
shifted) after a conv's epilogue, so the pad read the whole tensor the conv had just written
and wrote it again one pixel wider, a kernel launch more. With PackKernels extending FoldQDQ's
zero-point pad by its spare columns (one pad, not two in a row), the zoo's int8 detectors lost
nearly all their pad kernels, outputs bit-exact: YOLOX 139 -> 116 kernels, 11.53 -> 11.26 ms;
YOLOv8n 130 -> 109, 4.65 -> 4.63 ms; PicoDet 159 -> 131; YOLOX FP32 131 -> 108, 31.87 -> 31.59
ms (each pair built in one process and run alternately, medians; AMD Zen 4 VNNI host, 2
threads).

After FuseTIR, a call to a packed conv kernel (``tvmq_dot_conv2d`` / ``tvmq_fma_conv2d``, static
NHWC shapes) whose only reader is a constant pad of its height and width becomes one kernel:
its last epilogue block stores at ``[n, y + top, x + left, c]`` of the padded tensor, and a
small block in front fills the border rows and columns with the pad value. The border is
written through a second buffer over the same memory (``T.decl_buffer(..., data=P.data)``), so
the epilogue stays the only writer of its buffer and is still computed per register tile
(``reverse_compute_at`` needs a complete block); the two write disjoint elements.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx

from tvmq.passes.graph import FunctionGraph, call_op, map_functions, relax_functions

from .kernel_names import CONV_BLOCK, FMA_CONV_BLOCK

__all__ = ["WritePaddedOutputs", "constant_pad", "write_padded"]

_BORDER_BLOCK = "tvmq_pad_border"


def _static(shape) -> list[int] | None:
    return [int(d) for d in shape] if all(isinstance(d, tirx.IntImm) for d in shape) else None


def _shape(buffer) -> list[int] | None:
    return _static(buffer.ty.shape)


def _only_nest(stmt):
    """``(loops, block realize)`` of a perfect loop nest around one block, or None."""
    loops = []
    while isinstance(stmt, tirx.For):
        loops.append(stmt)
        stmt = stmt.body
    return (loops, stmt) if isinstance(stmt, s_tir.SBlockRealize) else None


def _root_items(func) -> list | None:
    root = func.body
    if not isinstance(root, s_tir.SBlockRealize):
        return None
    body = root.block.body
    return list(body.seq) if isinstance(body, tirx.SeqStmt) else [body]


def constant_pad(func) -> tuple[list[int], object] | None:
    """``(before, value)`` of a PrimFunc that is one constant pad (TOPI's ``PadInput`` block):
    ``out[v] = if_then_else(inside, in[v - before], value)``; None for any other kernel."""
    if not isinstance(func, tirx.PrimFunc) or len(func.params) != 2:
        return None
    items = _root_items(func)
    nest = _only_nest(items[0]) if items and len(items) == 1 else None
    if nest is None:
        return None
    block = nest[1].block
    store = block.body
    if not block.name_hint.startswith("PadInput") or not isinstance(store, tirx.BufferStore):
        return None
    value = store.value
    if not (isinstance(value, tvm.ir.Call) and value.op.same_as(tvm.ir.Op.get("prim.if_then_else"))):
        return None
    _, load, pad = value.args
    if not isinstance(load, tvm.ir.expr.TensorLoad) or not isinstance(pad, (tirx.IntImm, tirx.FloatImm)):
        return None
    if not load.source.same_as(func.params[0]) or not store.buffer.same_as(func.params[1]):
        return None
    before = []
    for index, out_index in zip(load.indices, store.indices):
        if index.same_as(out_index):
            before.append(0)
        elif isinstance(index, tirx.Sub) and index.a.same_as(out_index) and isinstance(index.b, tirx.IntImm):
            before.append(int(index.b.value))
        else:
            return None
    return before, pad


def _writer(items, buffer):
    """``(position in items, loops, block realize)`` of the one block writing ``buffer``; None
    when another block writes or reads it, or its writer is not a perfect nest at the root."""
    found = None
    for i, item in enumerate(items):
        nest = _only_nest(item)
        if nest is None:
            return None
        block = nest[1].block
        if any(r.source.same_as(buffer) for r in block.reads):
            return None
        if any(w.source.same_as(buffer) for w in block.writes):
            spatial = block.init is None and all(int(v.iter_type) == tirx.IterVar.DataPar for v in block.iter_vars)
            if found is not None or not spatial or not isinstance(block.body, tirx.BufferStore):
                return None  # a second writer, or the reduction itself (it reads what it writes)
            found = (i, *nest)
    return found


def _is_packed_conv(items) -> bool:
    return any((nest := _only_nest(item)) is not None and nest[1].block.name_hint in (CONV_BLOCK, FMA_CONV_BLOCK)
               for item in items)


def _border(padded: list[int], before: list[int], inner: list[int], dtype: str, value):
    """A template PrimFunc over the padded tensor ``P`` whose body fills the pad's border with
    ``value`` through a second buffer over P's memory: its parameter and statements are reused."""
    n, hp, wp, c = padded
    top, left = before[1], before[2]
    h, w = inner[1], inner[2]
    right = wp - left - w
    i64 = "T.int64({})".format
    shape = ", ".join(i64(d) for d in padded)
    literal = f"T.{dtype}({value.value!r})"
    side = []
    if left:
        side.append(f"""
                    for x, ch in T.grid({i64(left)}, {i64(c)}):
                        Q[b, y, x, ch] = {literal}""")
    if right:
        side.append(f"""
                    for x, ch in T.grid({i64(right)}, {i64(c)}):
                        Q[b, y, {i64(left + w)} + x, ch] = {literal}""")
    rows = f"""
                if y < {i64(top)} or y >= {i64(top + h)}:
                    for x, ch in T.grid({i64(wp)}, {i64(c)}):
                        Q[b, y, x, ch] = {literal}"""
    if side:
        rows += "\n                else:" + "".join(side)
    source = f"""
@T.prim_func(private=True, s_tir=True)
def border(P: T.Buffer(({shape}), "{dtype}")):
    Q = T.decl_buffer(({shape}), "{dtype}", data=P.data)
    with T.sblock("{_BORDER_BLOCK}"):
        T.reads()
        T.writes(Q[0:{i64(n)}, 0:{i64(hp)}, 0:{i64(wp)}, 0:{i64(c)}])
        for b, y in T.grid({i64(n)}, {i64(hp)}):{rows}
"""
    return tvm.script.from_source(source)


def write_padded(conv, before: list[int], padded: list[int], value):
    """``conv`` (a fused packed-conv PrimFunc) writing its output into the tensor of shape
    ``padded``, ``before`` pixels of the pad before each axis and ``value`` on the border; None
    where its output is not written by one plain epilogue block."""
    out = conv.params[-1]
    inner = _shape(out)
    items = _root_items(conv)
    if inner is None or items is None or len(inner) != 4 or not _is_packed_conv(items):
        return None
    found = _writer(items, out)
    if found is None:
        return None
    position, loops, realize = found
    template = _border(padded, before, inner, str(out.ty.dtype), value)
    target = template.params[0]
    store, block = realize.block.body, realize.block
    offsets = [tirx.IntImm(str(i.ty.dtype), b) for i, b in zip(store.indices, before)]
    shifted = [i + o if b else i for i, o, b in zip(store.indices, offsets, before)]
    writes = [tirx.BufferRegion(target, [tvm.ir.Range.from_min_extent(r.min + o if b else r.min, r.extent)
                                         for r, o, b in zip(w.region, offsets, before)])
              for w in block.writes]
    new_block = s_tir.SBlock(block.iter_vars, block.reads, writes, block.name_hint,
                             tirx.BufferStore(target, store.value, shifted), block.init, block.alloc_buffers,
                             block.match_buffers, block.annotations)
    stmt = s_tir.SBlockRealize(realize.iter_values, realize.predicate, new_block)
    for loop in reversed(loops):
        stmt = tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, stmt, loop.thread_binding, loop.annotations)
    items[position] = stmt
    border = _root_items(template)
    root = conv.body.block
    new_root = s_tir.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, tirx.SeqStmt(border + items),
                            root.init, root.alloc_buffers, root.match_buffers, root.annotations)
    body = s_tir.SBlockRealize(conv.body.iter_values, conv.body.predicate, new_root)
    return tirx.PrimFunc([*conv.params[:-1], target], body, conv.ret_type, conv.attrs)


@tvm.transform.module_pass(opt_level=0, name="WritePaddedOutputs")
class WritePaddedOutputs:
    """Merge each packed conv kernel with the constant pad of its output (the pad its only
    reader), after FuseTIR: see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        builder = relax.BlockBuilder(mod)
        merged, rewritten = {}, []

        def rewrite(func):
            new = self._function(mod, builder, func, merged)
            rewritten.append(new is not None)
            return new

        out = map_functions(mod, rewrite, builder=builder, remove_unused=True)  # drops the convs' old outputs
        if not any(rewritten):
            return mod
        entries = [gv.name_hint for gv, _ in relax_functions(out)]
        return relax.transform.DeadCodeElimination(entries)(out)  # the pads and convs no call is left to

    @staticmethod
    def _function(mod, builder, func, merged):
        graph = FunctionGraph(func)
        replace = {}
        for var, call in graph.values.items():
            if call_op(call) != "relax.call_tir" or len(call.args) != 2:
                continue
            pad_gv, args = call.args[0], call.args[1].fields
            pad = constant_pad(mod[pad_gv]) if len(args) == 1 else None
            source = args[0]
            producer = graph.value(source)
            if pad is None or call_op(producer) != "relax.call_tir" or len(producer.args) != 2 \
                    or graph.num_uses(source) != 1:
                continue
            before, value = pad
            padded = _static(call.ty.shape) if isinstance(call.ty, relax.TensorType) else None
            conv_gv = producer.args[0]
            if padded is None or len(padded) != 4 or before[0] or before[3] or not isinstance(mod[conv_gv], tirx.PrimFunc):
                continue
            inner = _shape(mod[conv_gv].params[-1])
            if inner is None or inner[0] != padded[0] or inner[3] != padded[3]:
                continue
            key = (conv_gv, tuple(before), tuple(padded), str(value))
            if key not in merged:
                new = write_padded(mod[conv_gv], before, padded, value)
                merged[key] = None if new is None else builder.add_func(new, conv_gv.name_hint + "_padded")
            if merged[key] is not None:
                replace[var] = relax.Call(call.op, [merged[key], producer.args[1]], call.attrs, call.ty_args)
        if not replace:
            return None
        blocks = []
        for block in func.body.blocks:
            bindings = [relax.VarBinding(b.var, replace[b.var]) if b.var in replace else b for b in block.bindings]
            blocks.append(relax.DataflowBlock(bindings) if isinstance(block, relax.DataflowBlock)
                          else relax.BindingBlock(bindings))
        return relax.Function(func.params, relax.SeqExpr(blocks, func.body.body), func.ret_ty, func.is_pure,
                              func.attrs, func.span)
