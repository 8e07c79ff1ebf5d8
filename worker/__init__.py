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

__all__ = [
    "InferenceError",
    "MissingResolution",
    "NotRGBSlide",
    "Nucleus",
    "NucleusTable",
    "SlideError",
    "TissueMaskError",
    "UnsupportedSlide",
    "WorkerError",
]
