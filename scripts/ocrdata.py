"""Labelled text-line images for the PP-OCR benchmarks, rendered with Pillow's built-in font.

No data set can be downloaded here, so the benchmarks render their own: random words and
numbers in Pillow's embedded FreeType font at varied sizes, offsets and contrast, with mild
noise. Deterministic for a given seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

WORDS = (
    "the quick brown fox jumps over lazy dog invoice total amount date paid order number street city "
    "station platform exit north south east west open closed monday friday price tax receipt model "
    "serial battery voltage warning danger keep door push pull delivery account balance express"
).split()
CLS_SHAPE = (3, 48, 192)
REC_SHAPE = (3, 48, 320)


def _font(size):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def random_text(rng) -> str:
    parts = []
    for _ in range(rng.integers(1, 4)):
        if rng.random() < 0.3:
            parts.append(str(rng.integers(0, 100000)))
        else:
            w = WORDS[rng.integers(len(WORDS))]
            parts.append(w.capitalize() if rng.random() < 0.3 else w)
    return " ".join(parts)


def render_line(text: str, rng):
    """A grayscale-on-RGB text line image (PIL), tightly cropped with a small margin."""
    from PIL import Image, ImageDraw

    size = int(rng.integers(22, 34))
    font = _font(size)
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(2, 8))
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    bg = int(rng.integers(190, 256))
    fg = int(rng.integers(0, 90))
    img = Image.new("RGB", (w, h), (bg, bg, bg))
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=(fg, fg, fg))
    arr = np.asarray(img).astype(np.float32)
    arr += rng.normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def preprocess(img, shape) -> np.ndarray:
    """rapidocr's resize_norm_img: keep aspect, height 48, pad right, scale to [-1, 1]."""
    from PIL import Image

    c, h, w = shape
    ratio = img.width / img.height
    resized_w = min(w, int(math.ceil(h * ratio)))
    img = img.resize((resized_w, h), Image.BILINEAR)
    arr = np.asarray(img).astype(np.float32).transpose(2, 0, 1) / 255.0
    arr = (arr - 0.5) / 0.5
    out = np.zeros(shape, np.float32)
    out[:, :, :resized_w] = arr
    return out


def cls_set(n: int, seed: int):
    """``(x [n,1,3,48,192], labels [n])``: label 1 means the line is upside down (180)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(n):
        img = render_line(random_text(rng), rng)
        flip = i % 2
        if flip:
            img = img.rotate(180)
        xs.append(preprocess(img, CLS_SHAPE)[None])
        ys.append(flip)
    return np.stack(xs), np.array(ys)


def rec_set(n: int, seed: int):
    """``(x [n,1,3,48,320], texts)`` for the recogniser."""
    rng = np.random.default_rng(seed)
    xs, texts = [], []
    for _ in range(n):
        text = random_text(rng)
        xs.append(preprocess(render_line(text, rng), REC_SHAPE)[None])
        texts.append(text)
    return np.stack(xs), texts


DET_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
DET_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


def det_set(n: int, seed: int, size: int = 320, width: int | None = None) -> np.ndarray:
    """``x [n,1,3,size,width]`` (width: ``size``): pages of 3-6 rendered text lines on a light
    background, normalized as PP-OCR's detector expects (ImageNet mean and std)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width = width or size
    xs = []
    for _ in range(n):
        bg = int(rng.integers(200, 256))
        page = Image.new("RGB", (width, size), (bg, bg, bg))
        for _ in range(rng.integers(3, 7)):
            line = render_line(random_text(rng), rng)
            if line.width > width - 8:
                line = line.resize((width - 8, max(8, line.height * (width - 8) // line.width)))
            page.paste(line, (int(rng.integers(0, width - line.width)), int(rng.integers(0, size - line.height))))
        arr = np.asarray(page).astype(np.float32).transpose(2, 0, 1) / 255.0
        xs.append(((arr - DET_MEAN) / DET_STD)[None])
    return np.stack(xs)


def binary_map_iou(prob: np.ndarray, reference: np.ndarray, threshold: float = 0.3) -> float:
    """IoU of the text masks (DB probability > threshold, PP-OCR's default) of two outputs."""
    a, b = np.asarray(prob) > threshold, np.asarray(reference) > threshold
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def ppocr_model(name: str) -> Path:
    """Path of a PP-OCR model shipped in the rapidocr-onnxruntime wheel (``pip install -e .[bench]``)."""
    import rapidocr_onnxruntime

    files = {
        "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "rec": "ch_PP-OCRv4_rec_infer.onnx",
        "det": "ch_PP-OCRv4_det_infer.onnx",
    }
    return Path(rapidocr_onnxruntime.__file__).parent / "models" / files[name]


def rec_charset(model_path) -> list[str]:
    """The recogniser's CTC alphabet: blank, the characters in the model's metadata, space."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return ["blank", *meta["character"].splitlines(), " "]


def ctc_decode(logits: np.ndarray, charset: list[str]) -> str:
    """Greedy CTC: best class per time step, repeats collapsed, blanks dropped."""
    best = np.asarray(logits).reshape(-1, len(charset)).argmax(axis=1)
    keep = np.ones(len(best), bool)
    keep[1:] = best[1:] != best[:-1]
    keep &= best != 0
    return "".join(charset[i] for i in best[keep])


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def rec_exact(outputs, labels) -> float:
    """Exact-string accuracy of the recogniser in percent (a ``python:ocrdata:rec_exact`` metric)."""
    charset = rec_charset(ppocr_model("rec"))
    return 100.0 * float(np.mean([ctc_decode(o, charset).strip() == str(t) for o, t in zip(outputs, labels)]))


def write_eval_folder(folder: Path, xs, labels) -> Path:
    """Samples as ``NNNN.npy`` and their ``labels.npy``: a folder for ``--eval-data`` / ``tvmq eval``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(xs):
        np.save(folder / f"{i:04d}.npy", x)
    np.save(folder / "labels.npy", np.asarray(labels))
    return folder
