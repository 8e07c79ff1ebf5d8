"""Detection and semantic targets from instance maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.panoptic import instance_targets, semantic_classes


def _two_nuclei() -> tuple[np.ndarray, np.ndarray]:
    inst = np.zeros((10, 12), np.int32)
    inst[1:4, 2:6] = 3  # rows 1..3, columns 2..5
    inst[6, 9] = 7  # a single pixel
    types = np.zeros_like(inst)
    types[1:4, 2:6] = 2
    types[1, 2] = 1  # a minority pixel of another class
    return inst, types


def test_boxes_span_pixel_edges_and_masks_are_the_nuclei() -> None:
    inst, _ = _two_nuclei()
    target = instance_targets(inst)
    np.testing.assert_array_equal(target["boxes"].numpy(), [[2, 1, 6, 4], [9, 6, 10, 7]])
    assert target["boxes"].dtype == torch.float32
    np.testing.assert_array_equal(target["labels"].numpy(), [1, 1])
    assert target["masks"].dtype == torch.uint8
    np.testing.assert_array_equal(target["masks"][0].numpy(), inst == 3)
    np.testing.assert_array_equal(target["masks"][1].numpy(), inst == 7)


def test_a_typed_nucleus_takes_its_majority_class_and_an_unclassed_one_class_1() -> None:
    inst, types = _two_nuclei()
    target = instance_targets(inst, types, num_classes=3)
    np.testing.assert_array_equal(target["labels"].numpy(), [2, 1])
    classes = semantic_classes(target, inst.shape).numpy()
    np.testing.assert_array_equal(classes, np.where(inst == 3, 2, np.where(inst == 7, 1, 0)))


def test_an_empty_map_gives_empty_targets_of_the_right_shapes() -> None:
    target = instance_targets(np.zeros((8, 9), np.int32))
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 8, 9)


def test_bad_maps_are_refused() -> None:
    with pytest.raises(TypeError):
        instance_targets(np.zeros((4, 4), np.float32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="types"):
        instance_targets(np.zeros((4, 4), np.int32), np.zeros((3, 4), np.int32))
