"""The training loop: AdamW with a one-cycle or cosine schedule, resumable checkpoints, progress."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from models.card import read_card
from models.train.augment import AugmentOptions
from models.train.config import REPO_ROOT, ModelConfig, TrainConfig, load_config
from models.train.data import Item, PatchSampler, load_items, split_items
from models.train.families import TrainingFamily, family_of, training_family
from models.train.from_onnx import calibrate_batchnorm
from models.train.validate import Validator

__all__ = ["CHECKPOINT_NAME", "build_model", "run_training", "train"]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
"""File name of the latest checkpoint inside a run folder."""


def build_model(config: ModelConfig) -> nn.Module:
    """Instantiate the network a config names (any family's architecture,
    :data:`models.train.families.FAMILIES`)."""
    return family_of(config.architecture).builders[config.architecture](config.n_classes, **config.options)


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    opt = config.optim
    if opt.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=opt.lr,
            total_steps=config.steps,
            pct_start=max(opt.warmup_fraction, 1e-3),
            div_factor=20.0,
            final_div_factor=100.0,
        )
    warmup = max(1, int(config.steps * opt.warmup_fraction))

    def factor(step: int) -> float:
        if opt.schedule == "constant":
            return min(1.0, (step + 1) / warmup)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, config.steps - warmup)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _Running:
    """Exponential moving averages of the loss terms, for the progress bar and the log."""

    def __init__(self, decay: float = 0.95) -> None:
        self.decay = decay
        self.values: dict[str, float] = {}

    def update(self, terms: Mapping[str, float]) -> None:
        for key, value in terms.items():
            old = self.values.get(key)
            self.values[key] = value if old is None else self.decay * old + (1 - self.decay) * value


class _Batches(Dataset[dict[str, torch.Tensor]]):
    """Batches ``start .. stop - 1`` of a sampler, for a DataLoader's worker processes."""

    def __init__(self, sampler: PatchSampler, start: int, stop: int, batch_size: int) -> None:
        self.sampler, self.start, self.stop, self.batch_size = sampler, start, stop, batch_size

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.sampler.batch(self.start + index, self.batch_size)


def _quiet_worker(_: int) -> None:
    # each worker augments one batch at a time: nested thread pools only oversubscribe the cores
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def _batches(
    sampler: PatchSampler, config: TrainConfig, start: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """Training batches ``start .. steps - 1``, drawn in worker processes when the config asks."""
    if not config.loader_workers:
        return (sampler.batch(step, config.batch_size) for step in range(start, config.steps))
    loader = DataLoader(
        _Batches(sampler, start, config.steps, config.batch_size),
        batch_size=None,
        shuffle=False,
        num_workers=config.loader_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4,
        worker_init_fn=_quiet_worker,
        # fork after the parent has used its OpenMP pool can deadlock the children; spawn costs a
        # few seconds at start (each worker imports torch and receives the items)
        multiprocessing_context="spawn",
    )
    # Starting the workers draws their base seed from the global torch generator; restoring it
    # keeps the network's own random draws (dropout) those of a run without workers.
    state = torch.get_rng_state()
    batches = iter(loader)
    torch.set_rng_state(state)
    return batches


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash mid-write never leaves a truncated checkpoint


def _append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _evaluate(
    model: nn.Module, val_items: list[Item], config: TrainConfig, validate: Validator
) -> dict[str, float]:
    started = time.perf_counter()
    flat = dict(validate(model, val_items, config))
    logger.info(
        "held-out evaluation (%.0f s): %s",
        time.perf_counter() - started,
        ", ".join(f"{k} {v:.4f}" for k, v in flat.items()),
    )
    return flat


def run_training(
    config: TrainConfig,
    *,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    validate: Validator | None = None,
) -> Path:
    """Train per ``config``; see :func:`train`."""
    dev = _pick_device(device)
    family = training_family(config)  # a mismatched card or loss fails here, before data is read
    loss_fn = family.loss(config.loss).to(dev)
    if config.data.patch_size % family.stride:
        raise ValueError(f"data.patch_size {config.data.patch_size} must be a multiple of "
                         f"{family.stride} for a {family.name}-family network")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    _seed_everything(config.seed)
    run_dir = config.run_dir
    checkpoint = run_dir / CHECKPOINT_NAME
    if checkpoint.exists() and not resume:
        raise ValueError(f"{checkpoint} exists: resume it, or give the run another name")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config.model_dump_json(indent=2), encoding="utf-8")

    items = load_items(
        config.data_root,
        mpp=config.data.mpp,
        sources=config.data.sources,
        limit=config.data.max_items_per_source,
    )
    train_items, val_items = split_items(items, config.data.holdout)
    logger.info("%d training items, %d held out (%s)", len(train_items), len(val_items), config.data.holdout)
    if val_items and validate is None:
        logger.warning("no validator given: the %d held-out items are not scored and no best.pt "
                       "is chosen", len(val_items))
    sampler = PatchSampler(
        train_items,
        patch_size=config.data.patch_size,
        options=AugmentOptions(**config.augment),
        seed=config.seed,
        source_weights=config.data.source_weights,
        collate_fn=family.collate(config.model),
    )
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = build_model(config.model).to(dev)
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay
    )
    scheduler = _scheduler(optimizer, config)

    start, metrics, best = 0, {}, -math.inf
    if config.init_from is not None and not (resume and checkpoint.exists()):
        source = config.init_from if config.init_from.is_absolute() else REPO_ROOT / config.init_from
        _initialise(model, source, config, sampler, dev, family)
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location=dev, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, metrics, best = (
            int(state["step"]),
            dict(state.get("metrics", {})),
            float(state.get("best", -math.inf)),
        )
        logger.info("resumed %s at step %d", checkpoint, start)

    def save(step: int, path: Path = checkpoint) -> None:
        _save(
            path,
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "config": config.model_dump(mode="json"),
                "metrics": metrics,
                "best": best,
            },
        )

    running = _Running()
    model.train()
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch size: pick the fastest kernels once
    bf16 = config.mixed_precision == "bf16"
    bar = tqdm(total=config.steps, initial=start, disable=not progress, mininterval=5.0, desc=config.name)
    for step, drawn in enumerate(_batches(sampler, config, start, dev), start=start):
        batch = {k: v.to(dev, non_blocking=True) for k, v in drawn.items()}
        batch["image"] = batch["image"].contiguous(memory_format=memory_format)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = family.forward(model, batch)
        loss, terms = loss_fn({k: v.float() for k, v in outputs.items()}, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}: {terms}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        running.update({"loss": float(loss.detach()), **terms})
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.values.items()}, refresh=False)
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            record = {"step": done, "lr": scheduler.get_last_lr()[0], **running.values}
            _append_jsonl(run_dir / "log.jsonl", record)
            logger.info(
                "step %d: %s", done, " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step")
            )
        evaluate_now = bool(val_items) and (
            (config.eval_every and done % config.eval_every == 0) or done == config.steps
        )
        if evaluate_now and validate is not None:
            metrics = {"step": done, **_evaluate(model, val_items, config, validate)}
            _append_jsonl(run_dir / "eval.jsonl", metrics)
            score = _selection_score(metrics)
            if score > best:
                best = score
                save(done, run_dir / "best.pt")
        if done % config.checkpoint_every == 0 or done == config.steps:
            save(done)
    bar.close()
    return checkpoint


_CALIBRATION_BATCHES = 12
_CALIBRATION_STEP = 10**9  # sampler steps far beyond any run's, so calibration never reuses a batch


def _initialise(
    model: nn.Module,
    source: Path,
    config: TrainConfig,
    sampler: PatchSampler,
    device: torch.device,
    family: TrainingFamily,
) -> None:
    """Start from another run's checkpoint, or from an exported ONNX model (a shipped one)."""
    if source.suffix.lower() != ".onnx":
        model.load_state_dict(torch.load(source, map_location=device, weights_only=True)["model"])
        logger.info("initialised from %s", source)
        return
    if family.onnx_init is None:
        raise ValueError(f"init_from {source}: a {family.name}-family network starts from a training "
                         "checkpoint (.pt), not from an exported ONNX file")
    card = read_card(source)
    if card.architecture != config.model.architecture or len(card.classes) not in (0, config.model.n_classes):
        raise ValueError(
            f"{source} is a {card.architecture} model with {len(card.classes)} classes; the config "
            f"trains {config.model.architecture} with {config.model.n_classes}"
        )
    model.cpu()
    family.onnx_init(model, source, card)
    batches = (
        sampler.batch(_CALIBRATION_STEP + k, config.batch_size)["image"] for k in range(_CALIBRATION_BATCHES)
    )
    calibrate_batchnorm(model, batches)
    model.to(device)
    logger.info("initialised from %s (BatchNorm recalibrated on %d batches)", source, _CALIBRATION_BATCHES)


def _selection_score(metrics: Mapping[str, float]) -> float:
    # mean of the headline held-out numbers that exist; NaN (undefined) counts as 0
    keys = [k for k in metrics if k.endswith(("/pq", "/f1_d", "/f_c_mean", "/aji"))]
    values = [0.0 if math.isnan(metrics[k]) else metrics[k] for k in keys]
    return float(np.mean(values)) if values else -math.inf


def train(
    config_path: str | Path,
    *,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    validate: Validator | None = None,
) -> Path:
    """Train a model from a YAML/JSON config (``hoverserve model train CONFIG``).

    Parameters
    ----------
    config_path : str or Path
        Training config (see :class:`models.train.config.TrainConfig`).
    resume : bool
        Continue from the run folder's ``last.pt`` (same batches as an uninterrupted run).
    device : str
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda[:N]"``.
    progress : bool
        Show a tqdm progress bar with the running losses.
    validate : callable, optional
        Scores the network on the held-out items (``data.holdout``) every ``eval_every`` steps
        and at the end: ``validate(model, items, config)`` → flat headline numbers; the best
        mean of the ``/pq``, ``/aji``, ``/f1_d`` and ``/f_c_mean`` numbers is kept as
        ``best.pt``. ``hoverserve model train`` passes
        :func:`worker.evaluation.validation.validate_training` (the card's post-processing).
        None: held-out items are not scored, and no ``best.pt`` is written.

    Returns
    -------
    Path
        The run's latest checkpoint (``<output_dir>/<name>/last.pt``).
    """
    return run_training(load_config(config_path), resume=resume, device=device, progress=progress,
                        validate=validate)
