"""Evaluation metrics for nuclear instance segmentation and classification.

Instance maps are (H, W) integer arrays, 0 background, ids need not be contiguous. Scores
that divide by zero (e.g. both maps empty) are NaN, meaning "undefined", never 0 or 1.
"""

from models.metrics._labels import InstanceTypes, Overlap, overlap
from models.metrics.detection import (
    CLASS_F1_WEIGHTS,
    ClassCounts,
    DetectionResult,
    detection_scores,
    pair_centroids,
    point_scores,
)
from models.metrics.instance import (
    PQResult,
    aji,
    aji_plus,
    aji_sums,
    dice,
    panoptic_quality,
)
from models.metrics.multiclass import (
    MulticlassPQ,
    MulticlassPQResult,
    count_r2,
    multiclass_pq,
)

__all__ = [
    "CLASS_F1_WEIGHTS",
    "ClassCounts",
    "DetectionResult",
    "InstanceTypes",
    "MulticlassPQ",
    "MulticlassPQResult",
    "Overlap",
    "PQResult",
    "aji",
    "aji_plus",
    "aji_sums",
    "count_r2",
    "detection_scores",
    "dice",
    "multiclass_pq",
    "overlap",
    "pair_centroids",
    "panoptic_quality",
    "point_scores",
]
