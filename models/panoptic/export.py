"""Export a panoptic network to ONNX under the ``instance`` family contract, its card embedded.

Contract: input ``image`` float32 1×3×H×W RGB 0..255, ONE image per run, H and W free (the graph
pads to a multiple of 32 itself, never resizes). Outputs, in descending score:

- ``boxes`` (K, 4) float32 x0, y0, x1, y1 in input pixels;
- ``scores`` (K,) float32;
- ``classes`` (K,) int64 in 1..C (C nucleus classes; 1 for an untyped card);
- ``masks`` (K, 1, 28, 28) float32 probabilities of the box's class over the box (torchvision's
  RoI-head output before it is pasted into the image: post-processing pastes).

Route: the TorchScript exporter (``dynamo=False``) traces the whole network, proposal selection
included: torchvision writes its RPN top-k, box decoding, clipping and NMS as ONNX ops
(NonMaxSuppression, TopK) under tracing, and RoIAlign as the ONNX op, so H, W and K stay dynamic
and nothing of the detector moves into the post-processing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from models.card import ModelCard
from models.errors import ExportError
from models.export import INPUT_NAME, export_target, write_traced
from models.families import PROBABILITY_SLACK
from models.panoptic.mask_head import MASK_SIZE

__all__ = [
    "INSTANCE_OUTPUTS", "InstanceHead", "check_instance_onnx", "export_instance_onnx", "reference_image",
]


INSTANCE_OUTPUTS = ("boxes", "scores", "classes", "masks")
"""Names of the exported graph's outputs."""

_CHECK_SEED = 20190810
_CHECK_SIZE = 256


class InstanceHead(nn.Module):
    """Export-only wrapper: one image → the contract's four tensors, by descending score."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        detections = self.model(image)
        if not isinstance(detections, list) or len(detections) != 1:
            raise ValueError("model(image) must return one detection dict per image in eval mode")
        found = detections[0]
        # torchvision's NMS already orders by score; sorting again makes the contract explicit
        order = torch.argsort(found["scores"], descending=True)
        return found["boxes"][order], found["scores"][order], found["labels"][order], found["masks"][order]


def reference_image(height: int = _CHECK_SIZE, width: int = _CHECK_SIZE) -> Tensor:
    """The seeded random 1×3×H×W RGB 0..255 image of the export check."""
    generator = torch.Generator().manual_seed(_CHECK_SEED)
    return torch.rand(1, 3, height, width, generator=generator) * 255.0


def export_instance_onnx(
    model: nn.Module, card: ModelCard, output: str | Path, *, opset: int = 17, check: bool = True
) -> Path:
    """Export ``model`` (a :class:`~models.panoptic.net.PanopticNet`) with ``card`` embedded.

    Parameters
    ----------
    model : torch.nn.Module
        In eval mode ``model(image)`` returns ``[{"boxes", "scores", "labels", "masks"}]`` for a
        1×3×H×W RGB 0..255 image; exported in eval mode on the CPU (its mode is restored).
    card : ModelCard
        Its card; ``family`` must be ``"instance"``; its classes (background first) must match
        the model's ``num_classes`` (2 for an untyped card).
    output : str or Path
        ONNX file to write; its folder must exist.
    opset : int
        ONNX opset.
    check : bool
        Run :func:`check_instance_onnx` on the written file.

    Returns
    -------
    Path
        ``output``.

    Raises
    ------
    ValueError
        Not an ``instance`` card, classes disagreeing with the model, or a missing folder.
    ExportError
        The exporter or ONNX Runtime failed, or the outputs break the contract.
    """
    if card.family != "instance":
        raise ValueError(f"card family must be 'instance', got {card.family!r}")
    output = export_target(output)
    n_classes = getattr(model, "num_classes", None)
    if n_classes is not None and n_classes != card.label_channels:
        raise ValueError(f"the model has {n_classes} box classes (background included) but the card "
                         f"describes {card.label_channels}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    head = InstanceHead(model.cpu()).eval()
    try:
        write_traced(lambda traced: _trace(head, reference_image(), traced, opset=opset), card, output)
    finally:
        model.to(device).train(was_training)
    if check:
        check_instance_onnx(output, card)
    return output


def _trace(head: InstanceHead, sample: Tensor, path: Path, *, opset: int) -> None:
    dynamic: dict[str, dict[int, str]] = {INPUT_NAME: {2: "height", 3: "width"}}
    dynamic.update({name: {0: "detections"} for name in INSTANCE_OUTPUTS})
    with torch.no_grad():
        head(sample)  # contract errors surface here as ValueError, not as exporter noise
    try:
        # the tracer warns about Python values frozen into the graph (torchvision's own, by design)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(head, (sample,), str(path), input_names=[INPUT_NAME],
                              output_names=list(INSTANCE_OUTPUTS), dynamic_axes=dynamic,
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(f"ONNX export failed: {exc}") from exc


def check_instance_onnx(
    path: str | Path, card: ModelCard, image: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Run one image through an exported file (ONNX Runtime, CPU) and validate the contract.

    Parameters
    ----------
    path : str or Path
        The ONNX file.
    card : ModelCard
        Its card (classes).
    image : ndarray, optional
        1×3×H×W float32 RGB 0..255; default :func:`reference_image`.

    Returns
    -------
    dict of str to ndarray
        The outputs, by name.

    Raises
    ------
    ExportError
        The file cannot be run, or an output is missing or has the wrong dtype, shape or values.
    """
    import onnxruntime as ort

    sample = reference_image().numpy() if image is None else np.asarray(image, np.float32)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = session.run(None, {INPUT_NAME: sample})
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"ONNX Runtime cannot run {path}: {exc}") from exc
    outputs = dict(zip(names, values, strict=True))
    _validate(outputs, card.label_channels - 1, path)
    return outputs


def _validate(outputs: dict[str, np.ndarray], n_classes: int, path: str | Path) -> None:
    if tuple(outputs) != INSTANCE_OUTPUTS:
        raise ExportError(f"{path}: outputs {list(outputs)}, expected {list(INSTANCE_OUTPUTS)}")
    count = len(outputs["scores"])
    expected = {"boxes": ((count, 4), np.float32), "scores": ((count,), np.float32),
                "classes": ((count,), np.int64), "masks": ((count, 1, MASK_SIZE, MASK_SIZE), np.float32)}
    for name, (shape, dtype) in expected.items():
        value = outputs[name]
        if value.shape != shape or value.dtype != dtype:
            raise ExportError(f"{path}: output {name} is {value.dtype} {value.shape}, "
                              f"expected {np.dtype(dtype)} {shape}")
        if not np.isfinite(value).all():
            raise ExportError(f"{path}: output {name} has non-finite values")
    if count and not 1 <= outputs["classes"].min() <= outputs["classes"].max() <= n_classes:
        raise ExportError(f"{path}: classes outside 1..{n_classes}")
    if np.any(np.diff(outputs["scores"]) > 0):
        raise ExportError(f"{path}: detections are not in descending score")
    masks = outputs["masks"]
    if masks.size and (masks.min() < -PROBABILITY_SLACK or masks.max() > 1 + PROBABILITY_SLACK):
        raise ExportError(f"{path}: mask probabilities outside 0..1")
