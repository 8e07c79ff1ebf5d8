"""Slide → nuclei: reading, tissue detection, region planning, inference, post-processing,
merging and writing. Knows nothing of HTTP."""

from worker.errors import (
    InferenceError,
    MissingResolution,
    NotRGBSlide,
    SlideError,
    TissueMaskError,
    UnsupportedSlide,
    WorkerError,
)
from worker.nuclei import Nucleus, NucleusTable
from worker.pipeline import InferenceOptions, RunResult, run_slide
from worker.postprocess import HoverInstances, hover_instances
from worker.slide import Slide, open_slide
from worker.tissue import TissueMask, detect_tissue, load_tissue_mask, tissue_mask_for
from worker.writers import read_table, write_all

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
