"""Refit an exported model's class decision on new class labels, leaving segmentation untouched.

A HoVer-style network ends its type branch with a 1×1 convolution: a linear softmax classifier
over the ``head_width`` features of every pixel. :func:`refit_type_head` re-estimates exactly that
layer from labelled pixels and writes a copy of the ONNX file with the new weights, so NP and HV
(hence every nucleus outline, PQ and AJI) are bit-for-bit those of the original model; only the
classes change. Labels come from

* outlined, classified nuclei (CoNSeP: every pixel of a nucleus has its class, background 0), and
* class points (BRCA-M2C: a dot per cell, no outline): a disk of :data:`POINT_RADIUS_UM` around each
  point, the part of the nucleus the point surely marks. Pixels near no point stay unlabelled (not
  every cell carries a point), so point data never teaches "background".

The fit is multinomial logistic regression with class-balanced sources, pulled towards the original
weights (an L2 penalty on the change), so classes the new data never shows keep their old meaning.
A temperature can be folded into the same layer (:func:`fit_temperature`): weights and bias
divided by T is exactly a softmax at temperature T.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import numpy_helper

__all__ = [
    "POINT_RADIUS_UM",
    "LabelledPixels",
    "TypeHead",
    "balance",
    "feature_session",
    "fit_temperature",
    "image_features",
    "point_pixels",
    "read_type_head",
    "refit_type_head",
    "type_map_pixels",
    "write_type_head",
]

logger = logging.getLogger(__name__)

POINT_RADIUS_UM = 2.0
"""Radius of the disk a class point labels (µm): well inside a 6-10 µm nucleus."""

_FEATURES = "tp_features"


@dataclass(frozen=True)
class TypeHead:
    """The last type layer: ``weight`` (C, F) and ``bias`` (C,), and the ONNX tensors holding them."""

    weight: NDArray[np.float32]
    bias: NDArray[np.float32]
    weight_name: str
    bias_name: str
    features_tensor: str


@dataclass(frozen=True)
class LabelledPixels:
    """Feature vectors (N, F) of labelled pixels, their classes (N,) and a weight per pixel."""

    features: NDArray[np.float32]
    labels: NDArray[np.int64]
    weights: NDArray[np.float32]

    @staticmethod
    def concat(parts: Sequence[LabelledPixels]) -> LabelledPixels:
        return LabelledPixels(np.concatenate([p.features for p in parts]),
                              np.concatenate([p.labels for p in parts]),
                              np.concatenate([p.weights for p in parts]))


def read_type_head(model: onnx.ModelProto) -> TypeHead:
    """Find the 1×1 convolution whose output feeds ``tp_prob`` (through slices and a softmax)."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    tensor = "tp_prob"
    while tensor in producer:
        node = producer[tensor]
        if node.op_type == "Conv":
            inits = {i.name: i for i in graph.initializer}
            if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
                break
            weight = numpy_helper.to_array(inits[node.input[1]])
            if weight.shape[2:] != (1, 1):
                break
            return TypeHead(weight[:, :, 0, 0].astype(np.float32),
                            numpy_helper.to_array(inits[node.input[2]]).astype(np.float32),
                            node.input[1], node.input[2], node.input[0])
        tensor = node.input[0]
    raise ValueError("the model has no 1x1 type convolution before tp_prob (untyped, or TTA)")


def write_type_head(model: onnx.ModelProto, weight: NDArray[np.floating],
                    bias: NDArray[np.floating]) -> onnx.ModelProto:
    """A copy of ``model`` with the type layer's weights replaced (shapes must match)."""
    head = read_type_head(model)
    if weight.shape != head.weight.shape or bias.shape != head.bias.shape:
        raise ValueError(f"type head is {head.weight.shape}, got {weight.shape} / {bias.shape}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name == head.weight_name:
            init.CopyFrom(numpy_helper.from_array(
                np.asarray(weight, np.float32)[:, :, None, None], init.name))
        elif init.name == head.bias_name:
            init.CopyFrom(numpy_helper.from_array(np.asarray(bias, np.float32), init.name))
    return out


def _feature_session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    head = read_type_head(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(
        head.features_tensor, onnx.TensorProto.FLOAT, None))
    probe.graph.output[-1].name = head.features_tensor
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])


def image_features(session: ort.InferenceSession, image: NDArray[np.uint8], *, input_size: int,
                   output_size: int, batch: int = 4) -> NDArray[np.float16]:
    """Per-pixel type features (F, H, W) of an RGB image already at the model's resolution,
    tiled as the pipeline tiles regions (reflected border, outputs of ``output_size``)."""
    import cv2

    margin = (input_size - output_size) // 2
    height, width = image.shape[:2]
    rows, cols = -(-height // output_size), -(-width // output_size)
    padded = cv2.copyMakeBorder(np.ascontiguousarray(image), margin,
                                margin + rows * output_size - height, margin,
                                margin + cols * output_size - width, cv2.BORDER_REFLECT_101)
    name = session.get_outputs()[-1].name
    out: NDArray[np.float16] | None = None
    origins = [(r * output_size, c * output_size) for r in range(rows) for c in range(cols)]
    for start in range(0, len(origins), batch):
        chunk = origins[start:start + batch]
        tiles = np.stack([padded[y:y + input_size, x:x + input_size] for y, x in chunk])
        (feats,) = session.run([name], {"image": tiles.transpose(0, 3, 1, 2).astype(np.float32)})
        if feats.shape[-1] == input_size:  # the features before the output crop
            feats = feats[:, :, margin:margin + output_size, margin:margin + output_size]
        if out is None:
            out = np.zeros((feats.shape[1], rows * output_size, cols * output_size), np.float16)
        for (y, x), f in zip(chunk, feats, strict=True):
            out[:, y:y + output_size, x:x + output_size] = f
    if out is None:
        raise ValueError("empty image")
    return out[:, :height, :width]


def type_map_pixels(features: NDArray[np.float16], types: NDArray[np.integer], *,
                    per_class: int, rng: np.random.Generator) -> LabelledPixels:
    """Up to ``per_class`` labelled pixels of each class (background included) of a type map."""
    picks = []
    for c in np.unique(types):
        where = np.flatnonzero(types.ravel() == c)
        picks.append(rng.choice(where, size=min(per_class, where.size), replace=False))
    flat = np.concatenate(picks) if picks else np.zeros(0, np.intp)
    feats = features.reshape(features.shape[0], -1)[:, flat].T.astype(np.float32)
    return LabelledPixels(feats, types.ravel()[flat].astype(np.int64), np.ones(flat.size, np.float32))


def point_pixels(features: NDArray[np.float16], xy: NDArray[np.floating], classes: NDArray[np.integer],
                 *, radius_px: float, per_point: int, rng: np.random.Generator) -> LabelledPixels:
    """Up to ``per_point`` pixels of the disk around each class point (points outside skipped)."""
    height, width = features.shape[1:]
    r = int(np.ceil(radius_px))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    inside = dy ** 2 + dx ** 2 <= radius_px ** 2
    dy, dx = dy[inside], dx[inside]
    flats, labels = [], []
    for (x, y), c in zip(xy, classes, strict=True):
        ys, xs = np.round(y).astype(int) + dy, np.round(x).astype(int) + dx
        ok = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
        if not ok.any():
            continue
        flat = ys[ok] * width + xs[ok]
        flat = rng.choice(flat, size=min(per_point, flat.size), replace=False)
        flats.append(flat)
        labels.append(np.full(flat.size, int(c), np.int64))
    if not flats:
        return LabelledPixels(np.zeros((0, features.shape[0]), np.float32), np.zeros(0, np.int64),
                              np.zeros(0, np.float32))
    flat = np.concatenate(flats)
    feats = features.reshape(features.shape[0], -1)[:, flat].T.astype(np.float32)
    return LabelledPixels(feats, np.concatenate(labels), np.ones(flat.size, np.float32))


def balance(parts: Iterable[LabelledPixels], n_classes: int) -> LabelledPixels:
    """Concatenate sources, weighting each source equally and each class within a source equally."""
    parts = [p for p in parts if p.labels.size]
    out = []
    for part in parts:
        counts = np.bincount(part.labels, minlength=n_classes).astype(np.float64)
        present = int((counts > 0).sum())
        w = (part.labels.size / np.maximum(counts, 1) / present)[part.labels]
        out.append(LabelledPixels(part.features, part.labels,
                                  (w / w.sum() / len(parts)).astype(np.float32)))
    return LabelledPixels.concat(out)


def refit_type_head(head: TypeHead, pixels: LabelledPixels, *, l2: float = 1e-2,
                    iterations: int = 300) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """New (weight, bias) of the type layer: weighted cross-entropy on ``pixels`` plus
    ``l2`` × the squared change from the current weights (L-BFGS, float64)."""
    import torch

    x = torch.from_numpy(pixels.features.astype(np.float64))
    y = torch.from_numpy(pixels.labels)
    w = torch.from_numpy(pixels.weights.astype(np.float64))
    w0 = torch.from_numpy(head.weight.astype(np.float64))
    b0 = torch.from_numpy(head.bias.astype(np.float64))
    weight, bias = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = x @ weight.T + bias
        loss = (torch.nn.functional.cross_entropy(logits, y, reduction="none") * w).sum() / w.sum()
        loss = loss + l2 * ((weight - w0) ** 2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return (weight.detach().numpy().astype(np.float32), bias.detach().numpy().astype(np.float32))


def fit_temperature(weight: NDArray[np.floating], bias: NDArray[np.floating],
                    pixels: LabelledPixels) -> float:
    """The softmax temperature minimising the weighted NLL of ``pixels`` (1-D search)."""
    from scipy.optimize import minimize_scalar

    logits = pixels.features.astype(np.float64) @ np.asarray(weight, np.float64).T + bias
    w = pixels.weights / pixels.weights.sum()

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-(w * logp[np.arange(len(z)), pixels.labels]).sum())

    found = minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded")
    return float(np.exp(found.x))


def feature_session(path: str | Path, *, threads: int = 2) -> tuple[onnx.ModelProto, ort.InferenceSession]:
    model = onnx.load(str(path))
    return model, _feature_session(model, threads)
