"""Export a TSFD-Net to ONNX under the ``boundary`` family contract, its card embedded.

Contract: input ``image`` float32 N×3×H×W RGB 0..255 (H = W = ``card.input_size``); outputs
``sem_prob`` N×C×h×w (softmax, channel 0 background, C = ``len(card.classes)`` or 2 for an untyped
card) and ``boundary_prob`` N×1×h×w (sigmoid), h = w = ``card.output_size``, the centre of the
input; batch axis dynamic. The tissue logits are training-only and not exported.
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

__all__ = ["BOUNDARY_OUTPUTS", "BoundaryHead", "check_boundary_onnx", "export_boundary_onnx"]


BOUNDARY_OUTPUTS = ("sem_prob", "boundary_prob")
"""Names of the exported graph's outputs."""

_CHECK_SEED = 20220220


class BoundaryHead(nn.Module):
    """Export-only wrapper: the network's ``sem`` / ``boundary`` logits → probabilities."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(image)
        if not isinstance(out, dict) or "sem" not in out or "boundary" not in out:
            raise ValueError("model.forward must return a dict with 'sem' and 'boundary' logits")
        return torch.softmax(out["sem"], dim=1), torch.sigmoid(out["boundary"])


def export_boundary_onnx(
    model: nn.Module, card: ModelCard, output: str | Path, *, opset: int = 17, check: bool = True
) -> Path:
    """Export ``model`` (e.g. :class:`~models.tsfd.net.TSFDNet`) with ``card`` embedded.

    Parameters
    ----------
    model : torch.nn.Module
        ``model(image)`` returns a dict with ``"sem"`` (N×C×h×w) and ``"boundary"`` (N×1×h×w)
        logits for an N×3×H×W RGB 0..255 image; exported in eval mode (its mode is restored).
    card : ModelCard
        Its card; ``family`` must be ``"boundary"``.
    output : str or Path
        ONNX file to write; its folder must exist.
    opset : int
        ONNX opset.
    check : bool
        Run one random patch through the file in ONNX Runtime and validate the outputs.

    Returns
    -------
    Path
        ``output``.

    Raises
    ------
    ValueError
        The card is not a ``boundary`` card, the folder is missing, or the model breaks the contract.
    ExportError
        The exporter or ONNX Runtime failed, or the outputs are misshapen or not finite.
    """
    if card.family != "boundary":
        raise ValueError(f"card family must be 'boundary', got {card.family!r}")
    output = export_target(output)
    sample = random_image(1, card.input_size)
    head = BoundaryHead(model)
    was_training = model.training
    model.eval()
    try:
        write_traced(lambda traced: _trace(head, sample, traced, opset=opset), card, output)
    finally:
        model.train(was_training)
    if check:
        check_boundary_onnx(output, card)
    return output


def random_image(batch: int, size: int) -> Tensor:
    """The seeded random RGB 0..255 patch used by the export check."""
    generator = torch.Generator().manual_seed(_CHECK_SEED)
    return torch.rand(batch, 3, size, size, generator=generator) * 255.0


def _trace(head: BoundaryHead, sample: Tensor, path: Path, *, opset: int) -> None:
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, *BOUNDARY_OUTPUTS)}
    with torch.no_grad():
        out = head(sample)  # contract errors surface here as ValueError, not as exporter noise
    if out[1].shape[1] != 1:
        raise ValueError(f"boundary logits must have 1 channel, got {out[1].shape[1]}")
    try:
        # the tracer warns about shapes frozen into constants: expected for a fixed patch size
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(head, (sample,), str(path), input_names=[INPUT_NAME],
                              output_names=list(BOUNDARY_OUTPUTS), dynamic_axes=dynamic,
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(f"ONNX export failed: {exc}") from exc


def check_boundary_onnx(path: str | Path, card: ModelCard, *, batch: int = 1) -> dict[str, np.ndarray]:
    """Run one random batch through an exported file (ONNX Runtime, CPU) and validate it.

    Returns
    -------
    dict of str to ndarray
        The outputs, by name.

    Raises
    ------
    ExportError
        The file cannot be run, or an output is missing, misshapen or not finite.
    """
    import onnxruntime as ort

    image = random_image(batch, card.input_size).numpy()
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = session.run(None, {INPUT_NAME: image})
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"ONNX Runtime cannot run {path}: {exc}") from exc
    outputs = dict(zip(names, values, strict=True))
    size = card.output_size
    expected = {"sem_prob": (batch, card.label_channels, size, size), "boundary_prob": (batch, 1, size, size)}
    if set(outputs) != set(expected):
        raise ExportError(f"{path}: outputs {sorted(outputs)}, expected {sorted(expected)}")
    for name, shape in expected.items():
        if outputs[name].shape != shape:
            raise ExportError(f"{path}: output {name} has shape {outputs[name].shape}, expected {shape}")
        if not np.isfinite(outputs[name]).all():
            raise ExportError(f"{path}: output {name} has non-finite values")
    return outputs
