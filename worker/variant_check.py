"""Is a reduced-precision variant as good as its original? Checked on a real image, on the CPU.

:func:`check_variant` runs the original and the variant on the same image and passes when

1. **probabilities** — on a reference batch (up to :data:`REFERENCE_PATCHES` network patches cut
   from the image at the model's resolution, exactly as a slide region cuts them), no probability
   output (``*_prob``) differs by more than ``prob_tolerance`` (default 1e-2) anywhere;
2. **nuclei** — both post-processed with the card's options over the whole image
   (:func:`worker.evaluation.model.predict_image_maps`, the family's ``segment``), the nuclei are
   the same (:func:`compare_nuclei`): as many in both, and each nucleus of the original has a
   partner in the variant with IoU > ``iou_threshold`` (default 0.9), IoU being
   |A ∩ B| / |A ∪ B| over the pixels of the post-processing's label grid.

Pairs are formed at IoU > 0.5, where a nucleus can have at most one partner (two disjoint
nuclei cannot both cover more than half of a third's union with them), so "each has a partner" is
a one-to-one matching. :func:`write_fp16_variant` converts, checks and writes only what passes,
on an image where the original finds nuclei (on bare glass any variant would pass).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from models.metrics import overlap
from models.precision import (
    PROBABILITY_TOLERANCE,
    fp16_variant,
    output_differences,
    probability_outputs,
    save_model,
)
from worker.errors import WorkerError
from worker.evaluation.model import predict_image_maps
from worker.families import job_options
from worker.infer import Model, load_model
from worker.options import Device

__all__ = [
    "IOU_THRESHOLD",
    "MATCH_IOU",
    "REFERENCE_PATCHES",
    "NucleiComparison",
    "VariantCheck",
    "VariantRejected",
    "check_variant",
    "compare_nuclei",
    "reference_batch",
    "write_fp16_variant",
]

logger = logging.getLogger(__name__)

IOU_THRESHOLD = 0.9
"""Smallest IoU a nucleus and its partner in the variant may have."""

MATCH_IOU = 0.5
"""IoU above which two nuclei are partners (at most one partner each)."""

REFERENCE_PATCHES = 16
"""Network patches in the reference batch (fewer when the image has fewer)."""


class VariantRejected(WorkerError):
    """A variant failed its check against the original and was not written."""


@dataclass(frozen=True)
class NucleiComparison:
    """The nuclei of an original (``reference``) and a variant (``candidate``) on one image."""

    reference: int
    candidate: int
    matched: int
    """Reference nuclei with a partner (IoU > :data:`MATCH_IOU`) in the candidate."""
    min_iou: float
    """Smallest IoU of any reference nucleus with its best candidate (0 without one; 1 when the
    reference has no nuclei)."""
    same_class: float | None = None
    """Share of partners with the same class (None when the model does not classify)."""

    def same(self, iou_threshold: float = IOU_THRESHOLD) -> bool:
        """Same count, and every reference nucleus has a partner with IoU > ``iou_threshold``."""
        return (self.reference == self.candidate and self.matched == self.reference
                and (self.reference == 0 or self.min_iou > iou_threshold))


def compare_nuclei(
    reference: NDArray[np.integer], candidate: NDArray[np.integer],
    reference_types: dict[int, int] | None = None, candidate_types: dict[int, int] | None = None,
) -> NucleiComparison:
    """Match the nuclei of two label maps of one grid (0 background, one id per nucleus).

    Parameters
    ----------
    reference, candidate : (H, W) integer ndarray
        Label maps of the original and the variant.
    reference_types, candidate_types : dict of int to int, optional
        Each label's class; given both, :attr:`NucleiComparison.same_class` is measured.

    Returns
    -------
    NucleiComparison
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"label maps differ in shape: {reference.shape} and {candidate.shape}")
    table = overlap(candidate, reference)  # the metrics' sparse table: reference as "gt"
    iou = table.iou
    best = np.zeros(table.gt.n)
    partner = np.full(table.gt.n, -1)
    order = np.argsort(iou, kind="stable")  # later (larger) IoUs overwrite smaller ones
    best[table.gt_index[order]] = iou[order]
    partner[table.gt_index[order]] = table.pred_index[order]
    n_ref, n_cand = table.gt.n, table.pred.n
    matched = best > MATCH_IOU
    same_class = None
    if reference_types is not None and candidate_types is not None and matched.any():
        agree = [reference_types.get(int(table.gt.ids[i]))
                 == candidate_types.get(int(table.pred.ids[partner[i]]))
                 for i in np.flatnonzero(matched)]
        same_class = float(np.mean(agree))
    return NucleiComparison(reference=n_ref, candidate=n_cand, matched=int(matched.sum()),
                            min_iou=float(best.min()) if n_ref else 1.0,
                            same_class=same_class)


@dataclass(frozen=True)
class VariantCheck:
    """What :func:`check_variant` measured, and whether the variant passed."""

    differences: dict[str, float]
    """Largest absolute difference of each network output on the reference batch."""
    nuclei: NucleiComparison
    patches: int
    """Patches in the reference batch."""
    prob_tolerance: float = PROBABILITY_TOLERANCE
    iou_threshold: float = IOU_THRESHOLD
    probabilities: tuple[str, ...] = field(default=())
    """The outputs held to ``prob_tolerance``."""

    @property
    def probabilities_pass(self) -> bool:
        return all(self.differences[name] <= self.prob_tolerance for name in self.probabilities)

    @property
    def passed(self) -> bool:
        return self.probabilities_pass and self.nuclei.same(self.iou_threshold)

    def summary(self) -> str:
        """One line: the differences, the nuclei and the verdict."""
        diffs = ", ".join(f"{name} {value:.2g}" for name, value in self.differences.items())
        n = self.nuclei
        classes = "" if n.same_class is None else f", same class {n.same_class:.1%}"
        return (f"{'passed' if self.passed else 'FAILED'}: max |Δ| on {self.patches} patches: {diffs} "
                f"(probabilities within {self.prob_tolerance:g}: "
                f"{'yes' if self.probabilities_pass else 'no'}); nuclei {n.reference} → {n.candidate}, "
                f"{n.matched} matched, min IoU {n.min_iou:.3f} (> {self.iou_threshold:g}: "
                f"{'yes' if n.same(self.iou_threshold) else 'no'}){classes}")


def reference_batch(model: Model, image: NDArray[np.uint8], mpp: float,
                    count: int = REFERENCE_PATCHES) -> NDArray[np.float32]:
    """Up to ``count`` network patches of ``image`` (RGB at ``mpp`` µm/px), spread over it.

    The image is resampled to the model's resolution and reflected by the network margin, and the
    patches are those a region of it would run (one per output tile).
    """
    card = model.card
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    scale = mpp / card.mpp
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    # Resampled as predict_image_maps resamples it, so the batch is what the nuclei check runs.
    small = image if size == (height, width) else cv2.resize(
        image, (size[1], size[0]), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    tile, pad = card.output_size, card.margin
    rows, cols = -(-size[0] // tile), -(-size[1] // tile)
    padded = cv2.copyMakeBorder(np.ascontiguousarray(small), pad, pad + rows * tile - size[0], pad,
                                pad + cols * tile - size[1], cv2.BORDER_REFLECT_101)
    cells = [(r * tile, c * tile) for r in range(rows) for c in range(cols)]
    picked = sorted({int(i) for i in np.linspace(0, len(cells) - 1, min(count, len(cells)))})
    batch = np.empty((len(picked), 3, card.input_size, card.input_size), np.float32)
    for k, i in enumerate(picked):
        r, c = cells[i]
        batch[k] = padded[r : r + card.input_size, c : c + card.input_size].transpose(2, 0, 1)
    return batch


def _nuclei(model: Model, image: NDArray[np.uint8], mpp: float) -> tuple[NDArray[np.int32], dict[int, int]]:
    maps = predict_image_maps(model, image, mpp)
    found = model.runner.segment(maps.arrays, mpp=model.card.mpp, options=job_options(model.card),
                                 typed=model.typed)
    return found.labels, {int(n.label): int(n.type) for n in found.nuclei}


def check_variant(
    reference: Model,
    candidate: Model,
    image: NDArray[np.uint8],
    mpp: float,
    *,
    prob_tolerance: float = PROBABILITY_TOLERANCE,
    iou_threshold: float = IOU_THRESHOLD,
) -> VariantCheck:
    """Compare a variant with its original on one RGB image (see the module's description).

    Parameters
    ----------
    reference, candidate : Model
        The original and the variant, loaded (on the CPU for a check tests can repeat).
    image : (H, W, 3) uint8 ndarray
        Real tissue with nuclei.
    mpp : float
        The image's resolution, µm per pixel (resampled to the model's).
    prob_tolerance : float
        Largest allowed difference of a probability.
    iou_threshold : float
        Smallest allowed IoU between a nucleus and its partner.

    Returns
    -------
    VariantCheck
    """
    if reference.outputs != candidate.outputs:
        raise ValueError(f"the variant outputs {candidate.outputs}, the original {reference.outputs}")
    batch = reference_batch(reference, image, mpp)
    differences = output_differences(reference.predict(batch), candidate.predict(batch))
    ref_labels, ref_types = _nuclei(reference, image, mpp)
    cand_labels, cand_types = _nuclei(candidate, image, mpp)
    typed = reference.typed
    nuclei = compare_nuclei(ref_labels, cand_labels, ref_types if typed else None,
                            cand_types if typed else None)
    return VariantCheck(differences=differences, nuclei=nuclei, patches=len(batch),
                        prob_tolerance=prob_tolerance, iou_threshold=iou_threshold,
                        probabilities=tuple(probability_outputs(differences)))


def write_fp16_variant(
    source: str | Path,
    output: str | Path,
    image: NDArray[np.uint8],
    mpp: float | None = None,
    *,
    device: Device = "cpu",
    prob_tolerance: float = PROBABILITY_TOLERANCE,
    iou_threshold: float = IOU_THRESHOLD,
) -> VariantCheck:
    """Convert ``source`` to float16, check it on ``image`` and write it to ``output`` if it passes.

    Parameters
    ----------
    source : str or Path
        A float32 HoVerServe model file.
    output : str or Path
        Where the variant goes; nothing is left there when the check fails.
    image : (H, W, 3) uint8 ndarray
        Real tissue with nuclei for the check.
    mpp : float, optional
        The image's resolution (default: the model's own).
    device : {"cpu", "cuda", "auto"}
        Where the check runs (default the CPU, whose float16 arithmetic ONNX Runtime emulates;
        ``cuda`` checks the GPU's own float16 kernels).
    prob_tolerance, iou_threshold : float
        As in :func:`check_variant`.

    Returns
    -------
    VariantCheck
        The passed check.

    Raises
    ------
    VariantRejected
        The variant failed (the message is the check's summary), or the image shows no nuclei.
    ValueError
        ``source`` is float16 already, or ``output`` is ``source``.
    """
    source, output = Path(source), Path(output)
    if output.resolve() == source.resolve():
        raise ValueError(f"the variant would overwrite its original {source}; name another output")
    original = load_model(source, device=device)
    proto, card = fp16_variant(source)
    partial = output.with_name(f".{output.name}.partial")
    save_model(proto, partial)
    try:
        variant = load_model(partial, device=device)
        check = check_variant(original, variant, image, card.mpp if mpp is None else mpp,
                              prob_tolerance=prob_tolerance, iou_threshold=iou_threshold)
        if check.nuclei.reference == 0:  # "the same nuclei" would hold for any variant
            raise VariantRejected(f"the float32 model finds no nuclei on the check image: give an "
                                  f"image of tissue with nuclei to check the fp16 variant of "
                                  f"{source.name} on")
        if not check.passed:
            raise VariantRejected(f"fp16 variant of {source.name} not written: {check.summary()}")
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("wrote %s: %s", output, check.summary())
    return check
