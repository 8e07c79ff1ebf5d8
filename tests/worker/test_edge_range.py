"""A fixed edge-map normalisation (``edge_range``): checked like every card option, and it makes
each nucleus's watershed depend on its neighbourhood alone, not on the extent of its map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.families import HoverOptions
from tests._synthetic import build_oracle, draw_ellipses, encode_slide, hv_maps, oracle_card
from worker.evaluation.edges import edge_extremes, measure_edge_range
from worker.evaluation.model import predict_image_maps
from worker.infer import load_model
from worker.postprocess import hover_instances
from worker.watershed import edge_response, sobel_gain


@pytest.mark.parametrize("bad", [(0.5, 0.5), (0.4, -0.4), (-1.5, 0.2), (float("nan"), 0.3)])
def test_an_edge_range_must_be_a_rising_pair_within_the_gain(bad: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="edge_range"):
        HoverOptions.from_mapping({"edge_range": list(bad)})


def test_an_edge_range_reads_from_a_card_as_a_pair_and_null_is_official() -> None:
    assert HoverOptions.from_mapping({"edge_range": [-0.5, 0.4]}).edge_range == (-0.5, 0.4)
    assert HoverOptions.from_mapping({"edge_range": None}).edge_range is None
    with pytest.raises(ValueError, match="edge_range"):
        HoverOptions.from_mapping({"edge_range": "wide"})
    with pytest.raises(ValueError, match="edge_range"):
        hover_instances(np.zeros((8, 8), np.float32), np.zeros((2, 8, 8), np.float32),
                        edge_range=(0.3, 0.1))


def test_the_gain_is_the_largest_response_on_a_unit_image() -> None:
    for ksize in (3, 11, 21):
        step = np.zeros((64, 64), np.float32)
        step[:, 32:] = 1.0  # the largest response a [0, 1] image gives: a sharp step
        response = edge_response(step * 2 - 1, 1, 0, ksize)  # HV scale: -1..1 maps to 0..1
        assert response.max() == pytest.approx(1.0)
        assert sobel_gain(ksize) > 0


def _nucleus_masks(labels: np.ndarray, window: tuple[slice, slice]) -> set[bytes]:
    """Nuclei lying wholly inside ``window``, each as its mask there."""
    inner = labels[window]
    border = set(np.unique(inner[[0, -1], :])) | set(np.unique(inner[:, [0, -1]]))
    return {(inner == k).tobytes() for k in np.unique(inner) if k and k not in border}


def test_with_a_fixed_range_a_nucleus_is_cut_the_same_in_any_map_extent() -> None:
    inst, _ = draw_ellipses((384, 384), 160, seed=5)
    np_prob = (inst > 0).astype(np.float32)
    hv = hv_maps(inst)
    hv[:, 256:, 256:] *= 0.6  # another part of the slide where the maps are weaker
    crop = (slice(32, 224), slice(32, 224))
    inner = (slice(30, 162), slice(30, 162))  # of the crop: 15 px clear of its edges
    fixed = (-0.5, 0.45)
    whole = hover_instances(np_prob, hv, mpp=0.25, edge_range=fixed).labels
    part = hover_instances(np_prob[crop], hv[:, crop[0], crop[1]], mpp=0.25, edge_range=fixed).labels
    in_whole = (slice(crop[0].start + inner[0].start, crop[0].start + inner[0].stop),
                slice(crop[1].start + inner[1].start, crop[1].start + inner[1].stop))
    same = _nucleus_masks(whole, in_whole)
    assert len(same) > 10
    assert same == _nucleus_masks(part, inner)


def test_the_measured_range_is_the_median_of_each_images_extremes(tmp_path: Path) -> None:
    card = oracle_card(input_size=144, output_size=128, mpp=0.25)
    model = load_model(build_oracle(tmp_path / "o.onnx", card))
    images, insts = [], []
    for seed in range(3):
        inst, classes = draw_ellipses((160, 160), 30, seed=seed)
        images.append(encode_slide(inst, classes))
        insts.append(inst)
    data = tmp_path / "set.npz"
    np.savez(data, images=np.stack(images), inst=np.stack(insts), mpp=np.float64(0.25))
    low, high = measure_edge_range(model, [data])
    ksize = 21  # the official aperture at 0.25 µm/px, the card's grid (upsample 1)
    each = [edge_extremes(predict_image_maps(model, im, 0.25).arrays["hv"], ksize) for im in images]
    assert (low, high) == (np.median([e[0] for e in each]), np.median([e[1] for e in each]))
    assert -1 <= low < 0 < high <= 1
