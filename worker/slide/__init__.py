"""Opening whole-slide images: one :class:`Slide` interface over OpenSlide, tifffile, wsidicom,
pydicom and Pillow readers, chosen by :func:`open_slide`."""

from worker.slide.base import MAX_MPP, MIN_MPP, PLANNING_PIXEL_BUDGET, Slide
from worker.slide.dicom_reader import DicomFrameSlide, WsiDicomSlide
from worker.slide.image_reader import ImageSlide
from worker.slide.open import open_slide
from worker.slide.openslide_reader import OpenSlideSlide
from worker.slide.overview import Overview, check_planning_budget, planning_overviews
from worker.slide.tiff_reader import TiffSlide

__all__ = [
    "MAX_MPP",
    "MIN_MPP",
    "PLANNING_PIXEL_BUDGET",
    "DicomFrameSlide",
    "ImageSlide",
    "OpenSlideSlide",
    "Overview",
    "Slide",
    "TiffSlide",
    "WsiDicomSlide",
    "check_planning_budget",
    "open_slide",
    "planning_overviews",
]
