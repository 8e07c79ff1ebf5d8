"""Slide → nuclei: reading, tissue detection, region planning, inference, post-processing,
merging and writing. Knows nothing of HTTP.

The names below are loaded on first use (as scikit-image does): importing one small module of
this package, e.g. ``worker.options`` from the command line, must not load the whole pipeline.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from worker.errors import (
    InferenceError,
    MissingResolution,
    NotRGBSlide,
    SlideError,
    TissueMaskError,
    UnsupportedSlide,
    WorkerError,
)

if TYPE_CHECKING:
    from worker.nuclei import Nucleus, NucleusTable
    from worker.options import InferenceOptions
    from worker.pipeline import RunResult, run_slide
    from worker.postprocess import HoverInstances, hover_instances
    from worker.slide import Slide, open_slide
    from worker.tissue import TissueMask, detect_tissue, load_tissue_mask, tissue_mask_for
    from worker.writers import read_table, write_all

_LAZY = {
    "Nucleus": "worker.nuclei", "NucleusTable": "worker.nuclei",
    "InferenceOptions": "worker.options", "RunResult": "worker.pipeline", "run_slide": "worker.pipeline",
    "HoverInstances": "worker.postprocess", "hover_instances": "worker.postprocess",
    "Slide": "worker.slide", "open_slide": "worker.slide",
    "TissueMask": "worker.tissue", "detect_tissue": "worker.tissue",
    "load_tissue_mask": "worker.tissue", "tissue_mask_for": "worker.tissue",
    "read_table": "worker.writers", "write_all": "worker.writers",
}

__all__ = [
    "HoverInstances",
    "InferenceError",
    "InferenceOptions",
    "MissingResolution",
    "NotRGBSlide",
    "Nucleus",
    "NucleusTable",
    "RunResult",
    "Slide",
    "SlideError",
    "TissueMask",
    "TissueMaskError",
    "UnsupportedSlide",
    "WorkerError",
    "detect_tissue",
    "hover_instances",
    "load_tissue_mask",
    "open_slide",
    "read_table",
    "run_slide",
    "tissue_mask_for",
    "write_all",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'worker' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
