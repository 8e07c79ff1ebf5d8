"""Errors raised by :mod:`worker`.

Tree::

    WorkerError
    ├── SlideError               a slide cannot be used
    │   ├── UnsupportedSlide     unreadable, unknown format, truncated
    │   ├── NotRGBSlide          grey, 16-bit or multichannel (fluorescence) images
    │   ├── MissingResolution    no µm/px in the metadata and none given
    │   └── SlideTooLarge        cannot be planned within the pixel budget (no low level)
    ├── TissueMaskError          a user-supplied tissue mask is unusable
    └── InferenceError           the model could not be loaded or run
"""

from __future__ import annotations

__all__ = [
    "InferenceError",
    "MissingResolution",
    "NotRGBSlide",
    "SlideError",
    "SlideTooLarge",
    "TissueMaskError",
    "UnsupportedSlide",
    "WorkerError",
]


class WorkerError(Exception):
    """Base class of every error raised by :mod:`worker`."""


class SlideError(WorkerError):
    """A slide cannot be used."""


class UnsupportedSlide(SlideError):
    """The file is not a slide any reader understands (or is damaged)."""


class NotRGBSlide(SlideError):
    """The slide is not an 8-bit RGB brightfield image."""


class MissingResolution(SlideError):
    """The slide states no resolution and the caller gave none."""


class SlideTooLarge(SlideError):
    """Planning the slide would decode more pixels than the budget allows: the slide is large
    and has no low-resolution pyramid level (give an ROI, or convert it to a pyramid)."""


class TissueMaskError(WorkerError):
    """A user-supplied tissue mask cannot be read or does not fit the slide."""


class InferenceError(WorkerError):
    """The model file cannot be loaded or run."""
