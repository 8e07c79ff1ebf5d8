"""Augmentation keeps image, instances and types aligned, and is reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from models.train.augment import AugmentOptions, augment, random_crop_transform

GEOMETRY_ONLY = AugmentOptions(hue=0.0, saturation=0.0, brightness=0.0, contrast=0.0, stain=0.0, blur_p=0.0)


def _scene(size: int = 96) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    inst = np.zeros((size, size), np.int32)
    types = np.zeros((size, size), np.uint8)
    rows, cols = np.ogrid[:size, :size]
    for label in range(1, 12):
        r, c = rng.integers(8, size - 8, size=2)
        disc = (rows - r) ** 2 + (cols - c) ** 2 <= 25
        inst[disc] = label
        types[disc] = 1 + label % 4
    image = np.full((size, size, 3), 230, np.uint8)
    image[inst > 0] = (60, 20, 120)  # nuclei dark purple on a pale background
    return image, inst, types


@pytest.mark.parametrize("seed", range(6))
def test_geometry_moves_image_and_labels_together(seed: int) -> None:
    image, inst, types = _scene()
    out_img, out_inst, out_types = augment(
        image, inst, types, out_size=64, rng=np.random.default_rng(seed), options=GEOMETRY_ONLY
    )
    dark = out_img[..., 0] < 145
    agreement = np.mean(dark == (out_inst > 0))
    assert agreement > 0.97  # only interpolated boundary pixels may disagree
    assert np.array_equal(out_types > 0, out_inst > 0)
    for label in np.unique(out_inst[out_inst > 0]):
        assert len(np.unique(out_types[out_inst == label])) == 1


def test_output_shapes_dtypes_and_reproducibility() -> None:
    image, inst, types = _scene()
    a = augment(image, inst, types, out_size=48, rng=np.random.default_rng(3))
    b = augment(image, inst, types, out_size=48, rng=np.random.default_rng(3))
    assert a[0].shape == (48, 48, 3) and a[0].dtype == np.uint8
    assert a[1].dtype == np.int32 and a[2].dtype == np.uint8
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


def test_colour_changes_only_the_image() -> None:
    image, inst, types = _scene(64)
    options = AugmentOptions(zoom=(1.0, 1.0), rotation_deg=0.0, shear=0.0, flips=False, blur_p=1.0)
    out_img, out_inst, out_types = augment(
        image, inst, types, out_size=64, rng=np.random.default_rng(0), options=options
    )
    assert np.array_equal(out_inst, inst) and np.array_equal(out_types, types)
    assert not np.array_equal(out_img, image)


def test_no_augmentation_is_a_plain_crop() -> None:
    image, inst, types = _scene(64)
    out_img, out_inst, _ = augment(
        image, inst, types, out_size=64, rng=np.random.default_rng(0), options=AugmentOptions.none()
    )
    assert np.array_equal(out_img, image) and np.array_equal(out_inst, inst)


def test_crop_footprint_stays_inside_the_source() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        matrix = random_crop_transform((70, 90), 64, rng, AugmentOptions())
        corners = np.array([[0, 0, 1], [63, 0, 1], [0, 63, 1], [63, 63, 1]], float).T
        xs, ys = matrix @ corners
        assert xs.min() >= -1e-6 and xs.max() <= 89 + 1e-6
        assert ys.min() >= -1e-6 and ys.max() <= 69 + 1e-6


def test_bad_inputs_raise() -> None:
    image, inst, types = _scene(32)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="exceeds"):
        augment(image, inst, types, out_size=64, rng=rng)
    with pytest.raises(ValueError, match="uint8"):
        augment(image.astype(np.float32), inst, types, out_size=16, rng=rng)
    with pytest.raises(ValueError, match="differs"):
        augment(image, inst[:-1], types, out_size=16, rng=rng)
