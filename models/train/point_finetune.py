"""Fine-tune an exported model's classes with point supervision, keeping its segmentation anchored.

Point data sets (BRCA-M2C: a dot per cell, three classes, no outlines) say which class a cell is
but not where its nucleus ends. Each point therefore labels a small disk around it
(:func:`point_label_map`); every other pixel of a point patch is "unlabelled" and teaches nothing,
so point patches give a type loss only (no NP/HV loss: there are no outlines). Patches of outlined,
classified data (CoNSeP) are mixed into every batch with the full HoVer-Net loss, which keeps
NP/HV from drifting when shared layers train and keeps the colon classes.

What trains (:data:`TRAINABLE`): ``head`` the type head only (NP/HV outputs stay bit-for-bit the
original's), ``decoder`` the shared decoder and the type head, ``all`` every layer. BatchNorm keeps
the exported statistics throughout (eval mode): small mixed batches would otherwise re-estimate
them and shift every output.

Point patches have no outlines, so nothing would hold NP/HV in place on them when shared layers
train: on breast tissue the decoder drifts (more, looser detections). An *anchor* does: on point
patches the fine-tuned NP and HV are pulled towards the frozen original's (cross-entropy to its NP
probabilities, MSE to its HV), weighted by ``anchor_weight``.

The result is written as a new ONNX file whose card is the original's with a new name.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from models.card import ModelCard, read_card
from models.conic.builder import BUILDERS
from models.errors import ModelError
from models.train.augment import AugmentOptions, augment
from models.train.data import PatchSampler, load_items, split_items
from models.train.losses import HoverLoss
from models.train.type_head import POINT_RADIUS_UM

__all__ = [
    "IGNORE",
    "TRAINABLE",
    "PointFinetuneOptions",
    "PointPatches",
    "anchor_loss",
    "finetune_points",
    "point_label_map",
    "point_loss",
    "set_trainable",
]

logger = logging.getLogger(__name__)

IGNORE = 255
"""Label of pixels no point speaks for (cross-entropy ignores them)."""

Trainable = Literal["head", "decoder", "all"]
TRAINABLE: tuple[str, ...] = ("head", "decoder", "all")
"""What :func:`set_trainable` can leave trainable."""


def point_label_map(
    shape: tuple[int, int], xy: NDArray[np.floating], classes: NDArray[np.integer], *, radius_px: float,
    inst: NDArray[np.integer] | None = None,
) -> NDArray[np.uint8]:
    """A (H, W) uint8 map: each point's class on a disk of ``radius_px`` around it, else :data:`IGNORE`.

    With ``inst`` (a predicted instance map of the image), a point inside a nucleus labels that
    whole nucleus too, unless points of different classes fall in it (then only their disks).
    Where two disks overlap, the later point wins (points are a cell apart, so overlaps are rare).
    """
    if radius_px <= 0:
        raise ValueError(f"radius_px must be positive, got {radius_px}")
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    classes = np.asarray(classes).reshape(-1)
    if xy.shape[0] != classes.shape[0]:
        raise ValueError(f"{xy.shape[0]} points but {classes.shape[0]} classes")
    if classes.size and (classes.min() < 0 or classes.max() >= IGNORE):
        raise ValueError(f"classes must lie in 0..{IGNORE - 1}")
    if inst is not None and inst.shape != tuple(shape):
        raise ValueError(f"inst shape {inst.shape} differs from {tuple(shape)}")
    out = np.full(shape, IGNORE, np.uint8)
    if inst is not None and classes.size:
        cols = np.clip(np.rint(xy[:, 0]).astype(np.intp), 0, shape[1] - 1)
        rows = np.clip(np.rint(xy[:, 1]).astype(np.intp), 0, shape[0] - 1)
        owner: dict[int, int] = {}
        for nucleus, label in zip(inst[rows, cols].tolist(), classes.tolist(), strict=True):
            if nucleus:
                owner[nucleus] = label if owner.get(nucleus, label) == label else -1
        for nucleus, label in owner.items():
            if label >= 0:
                out[inst == nucleus] = label
    radius = max(1, math.floor(radius_px))
    for (x, y), value in zip(xy, classes, strict=True):
        cv2.circle(out, (int(np.rint(x)), int(np.rint(y))), radius, int(value), thickness=-1)
    return out


@dataclass(frozen=True)
class _PointItem:
    name: str
    image: NDArray[np.uint8]
    labels: NDArray[np.uint8]


class PointPatches:
    """Augmented patches of point-labelled images; batch ``step`` depends only on (seed, step).

    Parameters
    ----------
    folder : Path
        A point data set (``points.npz`` + ``images/``).
    class_names : sequence of str
        The model's classes (background first); point classes are matched by name.
    split : str, optional
        Only this split (e.g. ``train``).
    radius_um : float
        Radius of the disk each point labels, µm.
    mpp : float
        The model's resolution; the data must be at it.
    instances : mapping of str to array, optional
        Predicted instance map per image name: a point then labels its whole nucleus
        (:func:`point_label_map`).
    """

    def __init__(self, folder: Path, class_names: Sequence[str], *, split: str | None, radius_um: float,
                 mpp: float, patch_size: int, options: AugmentOptions, seed: int,
                 instances: Mapping[str, NDArray[np.integer]] | None = None) -> None:
        from models.evaluate_points import class_map, point_class_names, read_points

        mapping = class_map(point_class_names(folder), class_names)
        if not mapping:
            raise ValueError(f"{folder}: none of its classes matches the model's {list(class_names)}")
        self.items: list[_PointItem] = []
        counts = np.zeros(len(class_names), np.int64)
        for im in read_points(folder, split=split):
            if abs(im.mpp - mpp) > 1e-6 * mpp:
                raise ValueError(f"{folder}: points at {im.mpp} µm/px, the model works at {mpp}")
            keep = np.asarray([int(c) in mapping for c in im.classes], bool)
            classes = np.asarray([mapping.get(int(c), 0) for c in im.classes], np.int64)[keep]
            np.add.at(counts, classes, 1)
            labels = point_label_map(im.image.shape[:2], im.xy[keep], classes, radius_px=radius_um / im.mpp,
                                     inst=None if instances is None else instances[im.name])
            if min(labels.shape) >= patch_size:
                self.items.append(_PointItem(im.name, im.image, labels))
        if not self.items:
            raise ValueError(f"{folder}: no image of split {split!r} is at least {patch_size} px a side")
        self.counts = counts
        self.patch_size, self.options, self.seed = patch_size, options, seed

    def class_weights(self) -> NDArray[np.float32]:
        """Inverse-frequency weights of the classes the points carry (mean 1 over them; 0 elsewhere)."""
        weights = np.zeros(self.counts.size, np.float32)
        present = self.counts > 0
        weights[present] = 1.0 / self.counts[present]
        return weights / weights[present].mean()

    def batch(self, step: int, batch_size: int) -> dict[str, torch.Tensor]:
        """``image`` (N, 3, P, P) float 0-255 and ``tp`` (N, P, P) int64 with :data:`IGNORE`."""
        rng = np.random.default_rng([self.seed, 7, step])
        images, labels = [], []
        for index in rng.integers(len(self.items), size=batch_size):
            item = self.items[int(index)]
            blank = np.zeros(item.labels.shape, np.int32)
            image, _, tmap = augment(item.image, blank, item.labels, out_size=self.patch_size, rng=rng,
                                     options=self.options)
            images.append(image)
            labels.append(tmap)
        return {"image": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().contiguous(),
                "tp": torch.from_numpy(np.stack(labels).astype(np.int64))}


def point_loss(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Weighted cross-entropy over the labelled pixels only (0 when a batch has none)."""
    if not bool((target != IGNORE).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, weight=class_weights, ignore_index=IGNORE)


def anchor_loss(outputs: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
                ) -> torch.Tensor:
    """How far NP and HV moved from ``reference`` (the original's outputs on the same patches).

    Soft cross-entropy of the NP logits against the reference's NP probabilities, minus the
    reference's own entropy (so 0 when nothing moved), plus the mean squared HV difference.
    """
    target = torch.softmax(reference["np"], dim=1)
    log_p = torch.log_softmax(outputs["np"], dim=1)
    log_t = torch.log_softmax(reference["np"], dim=1)
    np_term = (target * (log_t - log_p)).sum(dim=1).mean()
    return np_term + F.mse_loss(outputs["hv"], reference["hv"])


def set_trainable(model: nn.Module, what: str) -> list[nn.Parameter]:
    """Freeze all but ``what`` (:data:`TRAINABLE`) of a ConicNet; returns the trainable parameters."""
    if what not in TRAINABLE:
        raise ValueError(f"unknown trainable part {what!r}; known: {TRAINABLE}")
    prefixes = {"head": ("tp_head.",), "decoder": ("decoder.", "tp_head."), "all": ("",)}[what]
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
        if param.requires_grad:
            params.append(param)
    return params


@dataclass(frozen=True)
class PointFinetuneOptions:
    """What :func:`finetune_points` reads, trains and writes."""

    points: Path
    data_root: Path
    points_split: str = "train"
    typed_sources: tuple[str, ...] = ("consep_train", "consep_test")
    holdout: tuple[str, ...] = ()
    trainable: str = "decoder"
    steps: int = 200
    point_batch: int = 4
    typed_batch: int = 4
    patch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 1e-4
    radius_um: float = POINT_RADIUS_UM  # the same disk the class-layer refit labels
    point_weight: float = 1.0
    anchor_weight: float = 1.0
    """Weight of :func:`anchor_loss` on the point patches (0: no anchor, no teacher pass)."""
    class_weights: tuple[float, ...] = (1.0, 5.0, 1.0, 1.0, 1.0)
    """Cross-entropy class weights of the typed (CoNSeP) patches, background first."""
    augment: dict[str, object] = field(default_factory=dict)
    """Overrides of :class:`AugmentOptions` (e.g. a stronger ``stain``), both patch kinds."""
    instances: Path | None = None
    """An ``.npz`` of predicted instance maps keyed by image name: points label whole nuclei."""
    seed: int = 0
    threads: int = 2
    log_every: int = 10


def _rebuild(path: Path, card: ModelCard) -> nn.Module:
    from models.train.from_onnx import load_onnx_weights

    if card.architecture not in BUILDERS:
        raise ValueError(f"{path}: architecture {card.architecture!r} cannot be fine-tuned here")
    model = BUILDERS[card.architecture](len(card.classes))
    load_onnx_weights(model, path, input_size=card.input_size, typed=bool(card.classes),
                      tta=card.test_time_augmentation)
    return model


def _samplers(options: PointFinetuneOptions, card: ModelCard) -> tuple[PointPatches, PatchSampler]:
    aug = AugmentOptions(**options.augment)  # type: ignore[arg-type]
    instances = None
    if options.instances is not None:
        with np.load(options.instances, allow_pickle=False) as arrays:
            instances = {name: arrays[name] for name in arrays.files}
    points = PointPatches(options.points, [c.name for c in card.classes], split=options.points_split,
                          radius_um=options.radius_um, mpp=card.mpp, patch_size=options.patch_size,
                          options=aug, seed=options.seed, instances=instances)
    items = load_items(options.data_root, mpp=card.mpp, sources=options.typed_sources)
    train, _ = split_items(items, options.holdout)
    typed = PatchSampler([i for i in train if i.typed], patch_size=options.patch_size, options=aug,
                         seed=options.seed)
    logger.info("%d point images (%s points per class), %d typed items", len(points.items),
                points.counts.tolist(), len(typed.items))
    return points, typed


def _step_loss(model: nn.Module, points: Mapping[str, torch.Tensor], typed: Mapping[str, torch.Tensor],
               hover: HoverLoss, point_weights: torch.Tensor, options: PointFinetuneOptions,
               teacher: nn.Module | None) -> tuple[torch.Tensor, dict[str, float]]:
    images = torch.cat([points["image"], typed["image"]]).contiguous(memory_format=torch.channels_last)
    out = model(images)
    n = points["image"].shape[0]
    seg, terms = hover({k: v[n:].float() for k, v in out.items()}, typed)
    pl = point_loss(out["tp"][:n].float(), points["tp"], point_weights)
    terms["point_ce"] = float(pl.detach())
    total = seg + options.point_weight * pl
    if teacher is not None:
        with torch.no_grad():
            reference = teacher(images[:n])
        anchor = anchor_loss({k: v[:n].float() for k, v in out.items()}, reference)
        terms["anchor"] = float(anchor.detach())
        total = total + options.anchor_weight * anchor
    return total, terms


def finetune_points(model_path: str | Path, output: str | Path, options: PointFinetuneOptions, *,
                    name: str, version: str = "1", run_dir: Path | None = None) -> ModelCard:
    """Fine-tune ``model_path`` per ``options`` and write the result to ``output``; returns its card.

    ``run_dir`` (optional) receives ``log.jsonl`` (running losses) and ``options.json``.
    """
    from models.export import export_onnx

    model_path = Path(model_path)
    card = read_card(model_path)
    if not card.classes:
        raise ValueError(f"{model_path} has no classes to fine-tune")
    if len(options.class_weights) != len(card.classes):
        raise ValueError(f"{len(options.class_weights)} typed class weights for {len(card.classes)} classes")
    torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    model = _rebuild(model_path, card).to(memory_format=torch.channels_last)
    model.eval()  # BatchNorm keeps the exported statistics
    teacher = None
    if options.anchor_weight and options.trainable != "head":  # "head" cannot move NP/HV
        teacher = _rebuild(model_path, card).to(memory_format=torch.channels_last)
        teacher.eval().requires_grad_(False)
    params = set_trainable(model, options.trainable)
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(1.0, s / options.steps))))
    points, typed = _samplers(options, card)
    hover = HoverLoss({"np_ce": 1.0, "np_dice": 1.0, "hv_mse": 1.0, "hv_msge": 2.0, "tp_ce": 1.0,
                       "tp_dice": 1.0}, class_weights=options.class_weights)
    point_weights = torch.from_numpy(points.class_weights())
    log = None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "options.json").write_text(json.dumps(asdict(options), default=str, indent=2), "utf-8")
        log = (run_dir / "log.jsonl").open("a", encoding="utf-8")
    running: dict[str, float] = {}
    try:
        for step in range(options.steps):
            loss, terms = _step_loss(model, points.batch(step, options.point_batch),
                                     typed.batch(step, options.typed_batch), hover, point_weights,
                                     options, teacher)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 5.0)
            optimizer.step()
            schedule.step()
            for key, value in {"loss": float(loss.detach()), **terms}.items():
                running[key] = value if key not in running else 0.9 * running[key] + 0.1 * value
            if (step + 1) % options.log_every == 0 or step + 1 == options.steps:
                logger.info("step %d: %s", step + 1, " ".join(f"{k}={v:.4f}" for k, v in running.items()))
                if log is not None:
                    log.write(json.dumps({"step": step + 1, **running}) + "\n")
                    log.flush()
    finally:
        if log is not None:
            log.close()
    new_card = card.model_copy(update={
        "name": name, "version": version,
        "description": f"{card.description} Fine-tuned ({options.trainable}, {options.steps} steps) "
                       f"with point supervision from {options.points.name} ({options.points_split}) "
                       f"and {'+'.join(options.typed_sources)}.".strip(),
    })
    model.to(memory_format=torch.contiguous_format)
    setattr(model, "margin", new_card.margin)  # noqa: B010 -- the exported graph returns the centre only
    export_onnx(model, new_card, output)
    return new_card


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m models.train.point_finetune MODEL -o OUT --points DIR ...`` (see ``--help``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m models.train.point_finetune",
                                     description="fine-tune a model's classes with point supervision")
    parser.add_argument("model", type=Path, help="ONNX model file")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--name", required=True, help="name written into the card")
    parser.add_argument("--points", type=Path, required=True, help="point data set (points.npz + images/)")
    parser.add_argument("--data-root", type=Path, required=True, help="the shared data/nuclei folder")
    parser.add_argument("--typed", nargs="+", default=["consep_train", "consep_test"])
    parser.add_argument("--holdout", nargs="*", default=[])
    parser.add_argument("--trainable", choices=TRAINABLE, default="decoder")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--point-batch", type=int, default=8)
    parser.add_argument("--typed-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--anchor", type=float, default=1.0)
    parser.add_argument("--stain", type=float, default=0.08)
    parser.add_argument("--instances", type=Path, help=".npz of predicted instance maps by image name")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--seed", type=int, default=0,
                        help="batch/augmentation seed (a new one when continuing a fine-tuned model)")
    parser.add_argument("--point-weight", type=float, default=1.0, help="weight of the point loss")
    parser.add_argument("--typed-class-weights", type=float, nargs="+", default=[1.0, 5.0, 1.0, 1.0, 1.0],
                        help="type cross-entropy weights on the typed patches, background first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    options = PointFinetuneOptions(
        points=args.points, data_root=args.data_root, typed_sources=tuple(args.typed),
        holdout=tuple(args.holdout), trainable=args.trainable, steps=args.steps,
        point_batch=args.point_batch, typed_batch=args.typed_batch, lr=args.lr,
        anchor_weight=args.anchor, augment={"stain": args.stain}, instances=args.instances,
        threads=args.threads, seed=args.seed, point_weight=args.point_weight,
        class_weights=tuple(args.typed_class_weights))
    try:
        finetune_points(args.model, args.output, options, name=args.name, run_dir=args.run_dir)
    except (ValueError, OSError, ModelError) as exc:
        parser.exit(2, f"point_finetune: error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
