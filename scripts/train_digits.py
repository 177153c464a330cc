"""Retrain the embedded demo model: a small CNN on scikit-learn's ``load_digits``.

Pure numpy (im2col convolutions, Adam), fixed seeds, so the same machine gives the
same weights every time. Writes, under ``tvmq/demo/``:

* ``digits.onnx``        the FP32 model (input ``input`` [N,1,8,8] float32, output ``logits`` [N,10])
* ``digits_test.npz``    the held-out test split: ``x`` [n,1,8,8] float32, ``y`` [n] int64
* ``digits_calib/``      the calibration split, one ``.npy`` [1,1,8,8] per sample

Usage: ``python scripts/train_digits.py [--epochs 40] [--out tvmq/demo]``
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

SEED = 20261127
N_TEST = 450
N_CALIB = 128

# (out_channels, in_channels) for the three 3x3 convolutions; a max-pool follows conv 2 and 3.
CONVS = [(8, 1), (16, 8), (32, 16)]
HIDDEN = 64


def load_split():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(x))
    x, y = x[order], y[order]
    test = (x[:N_TEST], y[:N_TEST])
    train = (x[N_TEST:], y[N_TEST:])
    calib = train[0][:N_CALIB]
    return train, test, calib


# ---------------------------------------------------------------- layers (NCHW)
def im2col(x, k=3, pad=1):
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = np.empty((n, c, k, k, h, w), dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = xp[:, :, i : i + h, j : j + w]
    return cols.reshape(n, c * k * k, h * w)


def col2im(cols, shape, k=3, pad=1):
    n, c, h, w = shape
    cols = cols.reshape(n, c, k, k, h, w)
    xp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=cols.dtype)
    for i in range(k):
        for j in range(k):
            xp[:, :, i : i + h, j : j + w] += cols[:, :, i, j]
    return xp[:, :, pad : pad + h, pad : pad + w]


def conv_fwd(x, w, b):
    cols = im2col(x)
    out = np.einsum("ok,nkp->nop", w.reshape(w.shape[0], -1), cols) + b[None, :, None]
    n, _, h, wd = x.shape
    return out.reshape(n, w.shape[0], h, wd), cols


def conv_bwd(dout, x_shape, cols, w):
    n, o, h, wd = dout.shape
    d = dout.reshape(n, o, h * wd)
    dw = np.einsum("nop,nkp->ok", d, cols).reshape(w.shape)
    db = d.sum(axis=(0, 2))
    dcols = np.einsum("ok,nop->nkp", w.reshape(o, -1), d)
    return col2im(dcols, x_shape), dw, db


def pool_fwd(x):
    n, c, h, w = x.shape
    r = x.reshape(n, c, h // 2, 2, w // 2, 2)
    out = r.max(axis=(3, 5))
    mask = r == out[:, :, :, None, :, None]
    mask = mask / mask.sum(axis=(3, 5), keepdims=True)
    return out, mask


def pool_bwd(dout, mask):
    n, c, h, w = dout.shape
    return (mask * dout[:, :, :, None, :, None]).reshape(n, c, h * 2, w * 2)


def init_params(rng):
    params = {}
    for i, (o, c) in enumerate(CONVS):
        params[f"conv{i}.w"] = rng.normal(0, np.sqrt(2.0 / (c * 9)), (o, c, 3, 3)).astype(np.float32)
        params[f"conv{i}.b"] = np.zeros(o, np.float32)
    flat = CONVS[-1][0] * 2 * 2
    params["fc0.w"] = rng.normal(0, np.sqrt(2.0 / flat), (HIDDEN, flat)).astype(np.float32)
    params["fc0.b"] = np.zeros(HIDDEN, np.float32)
    params["fc1.w"] = rng.normal(0, np.sqrt(1.0 / HIDDEN), (10, HIDDEN)).astype(np.float32)
    params["fc1.b"] = np.zeros(10, np.float32)
    return params


def forward(params, x):
    cache = []
    h = x
    for i in range(len(CONVS)):
        z, cols = conv_fwd(h, params[f"conv{i}.w"], params[f"conv{i}.b"])
        a = np.maximum(z, 0)
        entry = {"x_shape": h.shape, "cols": cols, "z": z}
        if i > 0:
            a, entry["mask"] = pool_fwd(a)
        cache.append(entry)
        h = a
    flat = h.reshape(h.shape[0], -1)
    z0 = flat @ params["fc0.w"].T + params["fc0.b"]
    a0 = np.maximum(z0, 0)
    logits = a0 @ params["fc1.w"].T + params["fc1.b"]
    return logits, (cache, h.shape, flat, z0, a0)


def backward(params, logits, y, state):
    cache, hshape, flat, z0, a0 = state
    n = len(y)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(n), y] + 1e-12).mean()
    d = p
    d[np.arange(n), y] -= 1
    d /= n
    g = {"fc1.w": d.T @ a0, "fc1.b": d.sum(0)}
    da0 = d @ params["fc1.w"]
    dz0 = da0 * (z0 > 0)
    g["fc0.w"] = dz0.T @ flat
    g["fc0.b"] = dz0.sum(0)
    dh = (dz0 @ params["fc0.w"]).reshape(hshape)
    for i in reversed(range(len(CONVS))):
        entry = cache[i]
        if i > 0:
            dh = pool_bwd(dh, entry["mask"])
        dz = dh * (entry["z"] > 0)
        dh, g[f"conv{i}.w"], g[f"conv{i}.b"] = conv_bwd(dz, entry["x_shape"], entry["cols"], params[f"conv{i}.w"])
    return loss, g


def train(train_set, epochs, seed=SEED):
    rng = np.random.default_rng(seed)
    params = init_params(rng)
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(v) for k, v in params.items()}
    lr, b1, b2, step = 2e-3, 0.9, 0.999, 0
    x, y = train_set
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        losses = []
        for s in range(0, len(x), 32):
            idx = order[s : s + 32]
            logits, state = forward(params, x[idx])
            loss, grads = backward(params, logits, y[idx], state)
            losses.append(loss)
            step += 1
            for k in params:
                m[k] = b1 * m[k] + (1 - b1) * grads[k]
                v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
                mh = m[k] / (1 - b1**step)
                vh = v[k] / (1 - b2**step)
                params[k] = (params[k] - lr * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
        if epoch % 10 == 9 or epoch == epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {np.mean(losses):.4f}")
    return params


# ---------------------------------------------------------------- export
def to_onnx(params):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    for k, val in params.items():
        inits.append(numpy_helper.from_array(val, name=k))
    h = "input"
    for i in range(len(CONVS)):
        nodes.append(helper.make_node("Conv", [h, f"conv{i}.w", f"conv{i}.b"], [f"conv{i}"],
                                      name=f"conv{i}", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        h = f"relu{i}"
        if i > 0:
            nodes.append(helper.make_node("MaxPool", [h], [f"pool{i}"], name=f"pool{i}",
                                          kernel_shape=[2, 2], strides=[2, 2]))
            h = f"pool{i}"
    nodes.append(helper.make_node("Flatten", [h], ["flat"], name="flatten", axis=1))
    nodes.append(helper.make_node("Gemm", ["flat", "fc0.w", "fc0.b"], ["fc0"], name="fc0", transB=1))
    nodes.append(helper.make_node("Relu", ["fc0"], ["fc0_relu"], name="fc0_relu"))
    nodes.append(helper.make_node("Gemm", ["fc0_relu", "fc1.w", "fc1.b"], ["logits"], name="fc1", transB=1))
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tvmq")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tvmq" / "demo")
    args = ap.parse_args(argv)

    import onnx

    train_set, (xt, yt), calib = load_split()
    params = train(train_set, args.epochs)
    acc = (forward(params, xt)[0].argmax(1) == yt).mean()
    print(f"numpy FP32 test accuracy: {acc * 100:.2f}% on {len(yt)} held-out images")

    args.out.mkdir(parents=True, exist_ok=True)
    onnx.save(to_onnx(params), args.out / "digits.onnx")
    np.savez_compressed(args.out / "digits_test.npz", x=xt, y=yt)
    calib_dir = args.out / "digits_calib"
    shutil.rmtree(calib_dir, ignore_errors=True)
    calib_dir.mkdir()
    for i, sample in enumerate(calib):
        np.save(calib_dir / f"{i:04d}.npy", sample[None])
    print(f"wrote {args.out}/digits.onnx, digits_test.npz, digits_calib/ ({len(calib)} samples)")


if __name__ == "__main__":
    main()
