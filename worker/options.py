"""What a run may be asked for: every option's default and bounds, and the checked options value.

One module for these facts: the CLI's argument types, the API's job options
(``service.jobs.JobOptions``), the service settings and :class:`InferenceOptions` all read the
constants below, so a bound is typed once and a value one layer accepts is never refused by
another.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from models.families import MAX_UPSAMPLE

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EXPANSION_UM",
    "DEFAULT_HALO_UM",
    "DEFAULT_REGION_SIZE",
    "DEFAULT_WORKERS",
    "MAX_COORDINATE",
    "MAX_EXPANSION_UM",
    "MAX_MPP",
    "MAX_REGION_SIZE",
    "MAX_UPSAMPLE",
    "MIN_MPP",
    "MIN_REGION_SIZE",
    "Device",
    "InferenceOptions",
    "ObjectsOption",
    "TissueOption",
    "check_mpp",
    "check_roi",
]

MIN_MPP = 0.05
"""Smallest plausible microscope resolution, µm per pixel (beyond any optical microscope)."""

MAX_MPP = 10.0
"""Largest plausible whole-slide resolution, µm per pixel (a 1× scan). Coarser values in metadata
are taken to be a file format's default (72 dpi = 352.8 µm/px), not a measurement."""

DEFAULT_REGION_SIZE = 2048
"""Default region core side, model pixels (rounded to a multiple of the model's output size)."""

MIN_REGION_SIZE = 64
MAX_REGION_SIZE = 8192
"""Region core sides a job may ask for, model pixels (a 8192² region's maps hold ~1.3 GB)."""

DEFAULT_BATCH_SIZE = 8
"""Patches per inference batch."""

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
"""Default size of the read/post-process pool (processes)."""

DEFAULT_HALO_UM = 24.0
"""Default halo width, µm: about one and a half large nuclei (nuclei rarely exceed ~16 µm)."""

DEFAULT_EXPANSION_UM = 5.0
"""Default cell expansion, µm (QuPath's cell detection default, ``cellExpansionMicrons``)."""

MAX_EXPANSION_UM = 20.0
"""Largest cell expansion: the default halo (24 µm) must still hold a nucleus plus its cell."""

MAX_COORDINATE = 2**31 - 1
"""Largest roi coordinate or size, level-0 px (far beyond any slide; keeps arithmetic in int64)."""

Device = Literal["auto", "cpu", "cuda"]
TissueOption = Literal["auto", "none"] | Path
ObjectsOption = Literal["detections", "cells"]
OBJECTS: tuple[ObjectsOption, ...] = ("detections", "cells")


def check_mpp(value: float) -> float:
    """``value`` if it is a plausible resolution, else ValueError naming the range."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        spelled = ("NaN" if isinstance(value, float) and math.isnan(value)
                   else ("Infinity" if value > 0 else "-Infinity")
                   if isinstance(value, float) and math.isinf(value) else repr(value))
        raise ValueError(f"mpp must be a finite number of µm per pixel, got {spelled}")
    if not MIN_MPP <= value <= MAX_MPP:
        raise ValueError(f"mpp must be between {MIN_MPP} and {MAX_MPP} µm per pixel, got {value:g} "
                         "(e.g. 0.25 for a 40× scan, 0.5 for 20×)")
    return float(value)


def check_roi(roi: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """``roi`` (x, y, w, h, level-0 px) if its corner is in the first quadrant and its size
    positive, else ValueError."""
    x, y, w, h = roi
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise ValueError(f"roi wants x, y >= 0 and w, h > 0, got {list(roi)}")
    if max(roi) > MAX_COORDINATE:
        raise ValueError(f"roi values must be at most {MAX_COORDINATE} px, got {list(roi)}")
    return roi


@dataclass(frozen=True)
class InferenceOptions:
    """What to run and how. Built once by the caller (CLI or queue task) and passed down."""

    model: Path
    mpp: float | None = None
    roi: tuple[int, int, int, int] | None = None
    region_size: int = DEFAULT_REGION_SIZE
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int = DEFAULT_WORKERS
    device: Device = "auto"
    tissue: TissueOption = "auto"
    halo_um: float = DEFAULT_HALO_UM
    objects: ObjectsOption = "detections"
    cell_expansion_um: float = DEFAULT_EXPANSION_UM
    min_class_prob: float | None = None
    """Leave nuclei whose class probability is below this unclassified (None: the card's)."""
    trt_cache: Path | None = None
    """Folder where TensorRT keeps the engines it builds (None: rebuilt every start, minutes)."""
    trt_fp16: bool = False
    """Let TensorRT use float16 kernels for a float32 model (an fp16 model's card asks for them)."""

    def __post_init__(self) -> None:
        if self.mpp is not None:
            check_mpp(self.mpp)
        if self.roi is not None:
            check_roi(self.roi)
        if self.region_size < MIN_REGION_SIZE:
            raise ValueError(f"region_size must be >= {MIN_REGION_SIZE} model pixels, "
                             f"got {self.region_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.halo_um < 0:
            raise ValueError(f"halo_um must be >= 0, got {self.halo_um}")
        if self.objects not in OBJECTS:
            raise ValueError(f"objects must be 'detections' or 'cells', got {self.objects!r}")
        if not 0 < self.cell_expansion_um <= MAX_EXPANSION_UM:
            raise ValueError(f"cell_expansion_um must be within 0..{MAX_EXPANSION_UM} µm, "
                             f"got {self.cell_expansion_um}")
        if self.min_class_prob is not None and not 0 <= self.min_class_prob <= 1:
            raise ValueError(f"min_class_prob must be within 0..1, got {self.min_class_prob}")

    def parameters(self) -> dict[str, Any]:
        """JSON-ready record of the options, for the manifest."""
        return {
            "model": str(self.model), "mpp": self.mpp, "roi": list(self.roi) if self.roi else None,
            "region_size": self.region_size, "batch_size": self.batch_size,
            "workers": self.workers, "device": self.device, "tissue": str(self.tissue),
            "halo_um": self.halo_um, "objects": self.objects,
            "cell_expansion_um": self.cell_expansion_um, "min_class_prob": self.min_class_prob,
            "trt_cache": str(self.trt_cache) if self.trt_cache is not None else None,
            "trt_fp16": self.trt_fp16,
        }
