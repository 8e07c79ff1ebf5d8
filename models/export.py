"""Export a HoVer-Net-family network to an ONNX file carrying its model card.

The exported graph follows the HoVerServe model contract: input ``image`` float32 N×3×H×W RGB
0..255; outputs ``np_prob`` N×1×h×w, ``hv`` N×2×h×w and, for typed models, ``tp_prob`` N×C×h×w;
batch axis dynamic, patch size fixed (``card.input_size`` in, ``card.output_size`` out).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.card import ModelCard, embed_card
from models.errors import ExportError

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "TTA_TRANSFORMS",
    "OnnxHead",
    "check_onnx",
    "export_onnx",
    "write_with_card",
]

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
"""Name of the exported graph's input."""

OUTPUT_NAMES = ("np_prob", "hv", "tp_prob")
"""Names of the exported graph's outputs (``tp_prob`` only for typed models)."""

_CHECK_SEED = 20190821
"""Seed of the random check image, so a failing export reproduces."""


class _ContractError(ValueError):
    """The wrapped model's outputs break the model contract (raised while tracing)."""


TTA_TRANSFORMS: dict[str, tuple[tuple[bool, bool, bool], ...]] = {
    "none": ((False, False, False),),
    "flip": tuple((False, fh, fv) for fh in (False, True) for fv in (False, True)),
    "dihedral": tuple((t, fh, fv) for t in (False, True) for fh in (False, True) for fv in (False, True)),
}
"""Test-time augmentation: (transpose, flip left-right, flip up-down) applied in that order."""


def _transform(x: Tensor, transpose: bool, flip_x: bool, flip_y: bool) -> Tensor:
    if transpose:
        x = x.transpose(2, 3)
    if flip_x:
        x = x.flip(3)
    if flip_y:
        x = x.flip(2)
    return x


def _untransform(x: Tensor, transpose: bool, flip_x: bool, flip_y: bool) -> Tensor:
    if flip_y:
        x = x.flip(2)
    if flip_x:
        x = x.flip(3)
    if transpose:
        x = x.transpose(2, 3)
    return x


def _untransform_hv(hv: Tensor, transpose: bool, flip_x: bool, flip_y: bool) -> Tensor:
    """HV maps back to the input frame: a flip negates its axis' distances, a transpose swaps x and y."""
    h = -hv[:, 0] if flip_x else hv[:, 0]
    v = -hv[:, 1] if flip_y else hv[:, 1]
    vectors = torch.stack([v, h] if transpose else [h, v], dim=1)
    return _untransform(vectors, transpose, flip_x, flip_y)


class OnnxHead(nn.Module):
    """Export-only wrapper: raw head logits → the probabilities of the model contract.

    ``np_prob`` is channel 1 of the softmax over the 2 ``np`` logits, ``hv`` is passed through,
    ``tp_prob`` is the softmax over the ``tp`` logits (only when ``typed``). With test-time
    augmentation the patch runs through the network once per transform (one batch), and the
    probabilities and HV maps, mapped back to the input frame, are averaged.

    Parameters
    ----------
    model : torch.nn.Module
        Network whose ``forward(image)`` returns a dict with ``"np"``, ``"hv"`` and, when
        ``typed``, ``"tp"`` logits.
    typed : bool
        Whether to emit ``tp_prob``.
    tta : str
        Key of :data:`TTA_TRANSFORMS`: ``"none"``, ``"flip"`` (4 flips) or ``"dihedral"`` (all 8
        flips and rotations of the square patch).
    """

    def __init__(self, model: nn.Module, *, typed: bool, tta: str = "none") -> None:
        super().__init__()
        if tta not in TTA_TRANSFORMS:
            raise ValueError(f"tta must be one of {sorted(TTA_TRANSFORMS)}, got {tta!r}")
        self.model = model
        self.typed = typed
        self.transforms = TTA_TRANSFORMS[tta]

    def _logits(self, image: Tensor) -> dict[str, Tensor]:
        out = self.model(image)
        if not isinstance(out, dict) or "np" not in out or "hv" not in out:
            raise _ContractError("model.forward must return a dict with 'np' and 'hv' logits")
        if self.typed != ("tp" in out):
            raise _ContractError(
                f"the card is {'typed' if self.typed else 'untyped'} but the model "
                f"{'returns' if 'tp' in out else 'does not return'} 'tp' logits"
            )
        return out

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        if len(self.transforms) == 1:
            out = self._logits(image)
            np_prob, hv = F.softmax(out["np"], dim=1)[:, 1:2], out["hv"]
            tp_prob = F.softmax(out["tp"], dim=1) if self.typed else None
        else:
            batch = image.shape[0]
            out = self._logits(torch.cat([_transform(image, *t) for t in self.transforms]))
            np_all = F.softmax(out["np"], dim=1)[:, 1:2]
            tp_all = F.softmax(out["tp"], dim=1) if self.typed else None
            np_parts, hv_parts, tp_parts = [], [], []
            for index, t in enumerate(self.transforms):
                part = slice(index * batch, (index + 1) * batch)
                np_parts.append(_untransform(np_all[part], *t))
                hv_parts.append(_untransform_hv(out["hv"][part], *t))
                if tp_all is not None:
                    tp_parts.append(_untransform(tp_all[part], *t))
            count = float(len(self.transforms))
            np_prob = torch.stack(np_parts).sum(0) / count
            hv = torch.stack(hv_parts).sum(0) / count
            tp_prob = torch.stack(tp_parts).sum(0) / count if tp_parts else None
        if tp_prob is None:
            return np_prob, hv
        return np_prob, hv, tp_prob


def export_onnx(
    model: nn.Module,
    card: ModelCard,
    output: str | Path,
    *,
    opset: int = 17,
    check: bool = True,
) -> Path:
    """Export ``model`` to ONNX with ``card`` embedded, and check the file in ONNX Runtime.

    Contract of ``model`` (official HoVer-Net and the project's own networks alike):
    ``model(image)`` with ``image`` float32 N×3×H×W RGB in 0..255 (the model scales it
    itself), H = W = ``card.input_size``, returns a dict of raw logits, each N×C×h×w with
    h = w = ``card.output_size`` and centred on the input:

    - ``"np"``: 2 channels (background, nucleus);
    - ``"hv"``: 2 channels (horizontal = x, then vertical = y), exported unchanged;
    - ``"tp"``: ``len(card.classes)`` channels, channel 0 background — present exactly when
      the card lists classes.

    The model is exported in eval mode (its training flag is restored afterwards).

    Parameters
    ----------
    model : torch.nn.Module
        Network following the contract above, on any device.
    card : ModelCard
        Card to embed (ONNX ``metadata_props``, see :func:`models.card.card_metadata`).
    output : str or Path
        ONNX file to write; its folder must exist.
    opset : int
        ONNX opset.
    check : bool
        Load the written file in ONNX Runtime (CPU) and run one random patch through it.

    Returns
    -------
    Path
        ``output``.

    Raises
    ------
    ValueError
        The model's outputs do not follow the contract or disagree with the card.
    ExportError
        The exporter failed, or ONNX Runtime could not load or run the file, or its outputs
        have the wrong names, shapes or non-finite values.
    """
    output = export_target(output)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    sample = _random_image(1, card.input_size).to(device)
    head = OnnxHead(model, typed=bool(card.classes), tta=card.test_time_augmentation)
    write_traced(lambda traced: _trace_to_onnx(head, sample, traced, opset=opset), card, output)
    if check:
        check_onnx(output, card)
    return output


def check_onnx(path: str | Path, card: ModelCard, *, batch: int = 1) -> dict[str, np.ndarray]:
    """Run one random batch through an exported file in ONNX Runtime (CPU) and validate it.

    Parameters
    ----------
    path : str or Path
        ONNX file following the model contract.
    card : ModelCard
        Its card (patch sizes, classes).
    batch : int
        Batch size of the check run.

    Returns
    -------
    dict of str to ndarray
        The outputs, by name.

    Raises
    ------
    ExportError
        The file cannot be loaded or run, or an output is missing, misshapen or not finite.
    """
    import onnxruntime as ort

    image = _random_image(batch, card.input_size).numpy()
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = session.run(None, {INPUT_NAME: image})
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... exceptions
        raise ExportError(f"ONNX Runtime cannot run {path}: {exc}") from exc
    outputs = dict(zip(names, values, strict=True))
    _validate_outputs(outputs, card, batch=batch, path=path)
    return outputs


def _random_image(batch: int, size: int) -> Tensor:
    generator = torch.Generator().manual_seed(_CHECK_SEED)
    return torch.rand(batch, 3, size, size, generator=generator) * 255.0


def _trace_to_onnx(head: OnnxHead, sample: Tensor, path: Path, *, opset: int) -> None:
    """Write the ONNX model of ``head`` traced on ``sample`` (legacy TorchScript exporter)."""
    output_names = list(OUTPUT_NAMES if head.typed else OUTPUT_NAMES[:2])
    dynamic = {name: {0: "batch"} for name in [INPUT_NAME, *output_names]}
    was_training = head.model.training
    head.model.eval()
    try:
        # The tracer's warnings (shape arithmetic frozen into constants) are expected for a
        # fixed patch size; export_onnx's check run validates the result instead.
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            torch.onnx.export(
                head, (sample,), str(path), input_names=[INPUT_NAME], output_names=output_names,
                dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True,
                dynamo=False,
            )
    except _ContractError:
        raise
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(f"ONNX export failed: {exc}") from exc
    finally:
        head.model.train(was_training)
    for item in caught:
        logger.debug("exporter warning: %s", item.message)


def export_target(output: str | Path) -> Path:
    """``output`` as a Path, ValueError when its folder does not exist (checked before tracing)."""
    output = Path(output)
    if not output.parent.is_dir():
        raise ValueError(f"output folder {output.parent} does not exist")
    return output


def write_traced(trace: Callable[[Path], None], card: ModelCard, output: Path) -> None:
    """``trace(path)`` writes a graph into a temporary folder beside ``output`` (a failed export
    leaves no partial file); the graph then goes to ``output`` with ``card`` embedded."""
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".export-") as tmp:
        traced = Path(tmp) / "traced.onnx"
        trace(traced)
        write_with_card(traced, card, output)
    logger.info("exported %s (%.1f MB)", output, output.stat().st_size / 1e6)


def write_with_card(traced: Path, card: ModelCard, output: Path) -> None:
    """Write the traced graph at ``traced`` to ``output`` with ``card`` embedded, checked as ONNX."""
    import onnx

    proto = onnx.load(str(traced))
    embed_card(proto, card)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported graph is not valid ONNX: {exc}") from exc
    onnx.save(proto, str(output))


def _validate_outputs(
    outputs: dict[str, np.ndarray], card: ModelCard, *, batch: int, path: str | Path
) -> None:
    size = card.output_size
    expected = {"np_prob": (batch, 1, size, size), "hv": (batch, 2, size, size)}
    if card.classes:
        expected["tp_prob"] = (batch, len(card.classes), size, size)
    if set(outputs) != set(expected):
        raise ExportError(f"{path}: outputs {sorted(outputs)}, expected {sorted(expected)}")
    for name, shape in expected.items():
        value = outputs[name]
        if value.shape != shape:
            raise ExportError(f"{path}: output {name} has shape {value.shape}, expected {shape}")
        if not np.isfinite(value).all():
            raise ExportError(f"{path}: output {name} has non-finite values")
