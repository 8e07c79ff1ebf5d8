"""Training configuration: a pydantic model loaded from YAML or JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "CardConfig",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "load_config",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
"""Project root; relative paths in a config are taken from here."""

DEFAULT_DATA_ROOT = REPO_ROOT / ".." / "shared" / "data" / "nuclei"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Where the data is, at which resolution to train, and which source images are held out."""

    root: Path = DEFAULT_DATA_ROOT
    mpp: float = Field(0.5, gt=0)
    sources: tuple[str, ...] = ("consep_train", "consep_test", "monuseg", "cpm15")
    holdout: tuple[str, ...] = ()
    """Source-image groups kept for validation (e.g. ``consep_train_3``, ``monuseg_TCGA-...``)."""
    source_weights: dict[str, float] = Field(default_factory=dict)
    """Sampling weight per source (multiplies the area weight); missing sources weigh 1."""
    patch_size: int = Field(128, ge=32)
    max_items_per_source: int | None = None
    """Keep only the first N items of each source (smoke runs)."""

    @field_validator("patch_size")
    @classmethod
    def _multiple_of_16(cls, value: int) -> int:
        if value % 16:
            raise ValueError(f"patch_size must be a multiple of 16, got {value}")
        return value


class ModelConfig(_Strict):
    architecture: str = "conic"
    n_classes: int = 5
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword overrides passed to the builder."""


class LossConfig(_Strict):
    weights: dict[str, float] = Field(
        default_factory=lambda: {
            "np_ce": 1.0,
            "np_dice": 1.0,
            "hv_mse": 1.0,
            "hv_msge": 2.0,
            "tp_ce": 1.0,
            "tp_dice": 1.0,
        }
    )
    class_weights: tuple[float, ...] | None = None
    """Cross-entropy weight of each type class, background first."""


class OptimConfig(_Strict):
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    grad_clip: float | None = 5.0


class CardConfig(_Strict):
    """What goes into the exported model's card besides sizes and resolution."""

    name: str = "hoverserve-conic"
    version: str = "1"
    family: Literal["hover", "boundary", "instance"] = "hover"
    """Model family of the exported file (:mod:`models.families`): ``hover`` (HoVer-Net maps) or
    ``boundary`` (semantic + boundary maps, TSFD-Net) or ``instance`` (detections, the panoptic
    Mask R-CNN); the architecture must be one of its."""
    input_size: int = 256
    output_size: int = 224
    classes: tuple[tuple[str, tuple[int, int, int]], ...] = ()
    training_data: str = ""
    licence: str = ""
    description: str = ""
    postprocess: dict[str, Any] = Field(default_factory=dict)
    test_time_augmentation: Literal["none", "flip", "dihedral"] = "none"
    """Averaging over flips (4) or flips and rotations (8) built into the exported graph."""


class TrainConfig(_Strict):
    """A whole training run."""

    name: str = "conic"
    seed: int = 0
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(16, gt=0)
    num_threads: int | None = 2
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    eval_every: int = Field(0, ge=0)
    """Held-out evaluation (PQ etc.) every N steps; 0 = only at the end (when there is a hold-out)."""
    output_dir: Path = Path("runs")
    init_from: Path | None = None
    """Start from these weights (fine-tuning): a training checkpoint, or an exported ONNX model such as
    a shipped one (BatchNorm folded by the export is rebuilt and recalibrated); optimiser and step
    start afresh."""
    loader_workers: int = Field(0, ge=0)
    """Processes that draw and augment batches ahead of the model (0: in the training process).
    Batch ``k`` depends only on (seed, k), so the count never changes what is trained on."""
    mixed_precision: Literal["none", "bf16"] = "none"
    """Run the network's forward pass under bfloat16 autocast (CUDA; losses stay float32)."""
    channels_last: bool = False
    """Train in channels-last memory format: 2-3x faster convolution backward on CPU (oneDNN).
    Off by default: oneDNN 3.x in torch 2.13 corrupts memory in the backward pass of strided 1x1
    convolutions with fewer than 16 input channels in this format (seen with conic-tiny)."""
    data: DataConfig = Field(default_factory=lambda: DataConfig.model_validate({}))
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig.model_validate({}))
    augment: dict[str, Any] = Field(default_factory=dict)
    """Overrides of :class:`models.train.augment.AugmentOptions` fields."""
    card: CardConfig = Field(default_factory=CardConfig)

    @property
    def run_dir(self) -> Path:
        """Folder of this run's checkpoints and logs (``output_dir / name``, from the repo root)."""
        base = self.output_dir if self.output_dir.is_absolute() else REPO_ROOT / self.output_dir
        return base / self.name

    @property
    def data_root(self) -> Path:
        root = self.data.root
        return root if root.is_absolute() else REPO_ROOT / root


def load_config(path: str | Path) -> TrainConfig:
    """Read a training config from a ``.yaml``/``.yml`` or ``.json`` file.

    Raises
    ------
    ValueError
        The file cannot be parsed or does not describe a valid config (the message names the key).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text)
    elif path.suffix.lower() == ".json":
        raw = json.loads(text)
    else:
        raise ValueError(f"config {path} must be .yaml, .yml or .json")
    if not isinstance(raw, dict):
        raise ValueError(f"config {path} must hold a mapping at the top level")
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"invalid training config {path}: {exc}") from exc
