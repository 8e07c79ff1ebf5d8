"""Score an exported model on annotated images: ``hoverserve model evaluate MODEL DATA...``.

The model runs exactly as in a slide job (ONNX Runtime, the card's resolution, tiles of its output
size, HoVer-Net post-processing with the card's thresholds); only the context around an image
differs: a slide has real neighbours, an annotated image is reflected at its border. Predictions
are scored at the data's own resolution (labels upsampled by nearest neighbour when the model
works coarser), so numbers compare with published ones on the same data.

Data sets: the layouts :func:`models.datasets.read_labelled` reads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from models.datasets import read_labelled
from models.evaluate import evaluate_dataset, radius_for_mpp
from models.families import HoverOptions
from worker.postprocess import segment_maps

__all__ = [
    "POSTPROCESS_KEYS",
    "ImageMaps",
    "card_postprocess",
    "evaluate_model",
    "instances_from_maps",
    "nuclei_from_maps",
    "predict_image_maps",
    "predict_instances",
    "sweep_postprocess",
]

logger = logging.getLogger(__name__)

POSTPROCESS_KEYS = HoverOptions.KEYS
"""Card post-processing options evaluation can override."""

def _resize(image: NDArray, shape: tuple[int, int], interpolation: int) -> NDArray:
    return cv2.resize(image, (shape[1], shape[0]), interpolation=interpolation)


@dataclass(frozen=True)
class ImageMaps:
    """A model's maps for one image, at the model's resolution, cut to the image's extent."""

    np_prob: NDArray[np.float32]
    hv: NDArray[np.float32]
    types: NDArray | None
    shape: tuple[int, int]
    """The image's own (height, width), where labels are scored."""


def predict_image_maps(model: Any, image: NDArray[np.uint8], mpp: float) -> ImageMaps:
    """Run ``model`` (a :class:`worker.infer.Model`) on one RGB image at ``mpp`` µm/px.

    The image is resampled to the model's resolution (area averaging when shrinking), reflected
    by the network margin, tiled and run exactly as slide regions are.
    """
    from worker.infer import predict_maps
    from worker.plan import Box

    card = model.card
    height, width = image.shape[:2]
    scale = mpp / card.mpp
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    small = (
        image
        if size == (height, width)
        else _resize(image, size, cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    )
    tile = card.output_size
    rows, cols = -(-size[0] // tile) * tile, -(-size[1] // tile) * tile
    maps_box = Box(0, 0, rows, cols)
    pad = card.margin
    padded: NDArray[np.uint8] = cv2.copyMakeBorder(  # type: ignore[assignment]
        np.ascontiguousarray(small),
        pad,
        pad + rows - size[0],
        pad,
        pad + cols - size[1],
        cv2.BORDER_REFLECT_101,
    )
    maps = predict_maps(model, padded, maps_box.grow(pad), maps_box)
    crop = np.s_[: size[0], : size[1]]
    return ImageMaps(
        np_prob=maps.np_prob[crop],
        hv=maps.hv[:, : size[0], : size[1]],
        types=maps.types[crop] if maps.types is not None else None,
        shape=(height, width),
    )


def nuclei_from_maps(
    maps: ImageMaps, mpp: float, postprocess: Mapping[str, Any]
) -> tuple[NDArray[np.int32], dict[int, tuple[int, float]]]:
    """Post-processing of ``maps`` (made at ``mpp``) as a slide job does it: a label map at the
    image's size (nearest neighbour where the two grids differ) and each label's (type, class
    probability)."""
    options = HoverOptions.from_mapping(postprocess)
    found = segment_maps(maps.np_prob, maps.hv, maps.types, mpp=mpp, options=options)
    labels = found.labels.astype(np.int32)
    if labels.shape != maps.shape:
        labels = _resize(labels, maps.shape, cv2.INTER_NEAREST)
    return labels, {int(n.label): (int(n.type), float(n.type_prob)) for n in found.nuclei}


def instances_from_maps(
    maps: ImageMaps, mpp: float, postprocess: Mapping[str, Any]
) -> tuple[NDArray[np.int32], dict[int, int]]:
    """:func:`nuclei_from_maps` without the probabilities: labels and each label's type."""
    labels, nuclei = nuclei_from_maps(maps, mpp, postprocess)
    return labels, {label: kind for label, (kind, _) in nuclei.items()}


def card_postprocess(card: Any) -> dict[str, Any]:
    """The post-processing options a model's card sets."""
    return {k: card.postprocess[k] for k in POSTPROCESS_KEYS if k in card.postprocess}


def predict_instances(
    model: Any, image: NDArray[np.uint8], mpp: float
) -> tuple[NDArray[np.int32], dict[int, int]]:
    """Nuclei of one RGB image at ``mpp`` µm/px, with the card's post-processing: a label map at
    the image's size, and types."""
    maps = predict_image_maps(model, image, mpp)
    return instances_from_maps(maps, model.card.mpp, card_postprocess(model.card))


def evaluate_model(
    model_path: str | Path,
    data: str | Path,
    *,
    only: Sequence[str] = (),
    mpp: float | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Run a model file on every annotated image of ``data`` and score it.

    Parameters
    ----------
    model_path : str or Path
        ONNX model with a HoVerServe card.
    data : str or Path
        A data set (see the module docstring).
    only : sequence of str
        Keep only images whose name starts with one of these prefixes (e.g. held-out source
        images ``consep_test_2_``); empty keeps all.
    mpp : float, optional
        Resolution of the data, when the files do not say.
    device : str
        ``"cpu"``, ``"cuda"`` or ``"auto"``.

    Returns
    -------
    dict
        :func:`models.evaluate.evaluate_dataset`'s result plus ``model``, ``data`` and the
        ``postprocess`` options used (the card's). Classes are scored when the data has a
        type map and the model's classes match its class names.
    """
    return sweep_postprocess(model_path, data, [{}], only=only, mpp=mpp, device=device,
                             progress=progress)[0]


def sweep_postprocess(
    model_path: str | Path,
    data: str | Path,
    settings: Sequence[Mapping[str, float]],
    *,
    only: Sequence[str] = (),
    mpp: float | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Score a model under several post-processing settings, running the network once per image.

    Each setting overrides the card's options (``np_threshold``, ``marker_threshold``,
    ``upsample``); ``{}`` keeps the card's. Returns one :func:`evaluate_model`-style result per
    setting, in order: the way to choose a model's post-processing on held-out images of one's own.
    """
    from tqdm import tqdm

    from worker.infer import load_model

    for setting in settings:
        unknown = set(setting) - set(POSTPROCESS_KEYS)
        if unknown:
            raise ValueError(
                f"unknown post-processing option(s) {sorted(unknown)}; known: {POSTPROCESS_KEYS}"
            )
    model = load_model(model_path, device=device)  # type: ignore[arg-type]
    card_classes = tuple(c.name.lower() for c in model.card.classes)
    images = [im for im in read_labelled(data, mpp=mpp) if not only or im.name.startswith(tuple(only))]
    if not images:
        raise ValueError(f"{data}: no images{' match ' + ', '.join(only) if only else ''}")
    if len({im.mpp for im in images}) > 1:
        raise ValueError(
            f"{data}: images at several resolutions ({sorted({im.mpp for im in images})} µm/px); "
            "evaluate each resolution separately (--only)"
        )
    typed = all(im.types is not None for im in images) and model.typed
    data_classes = images[0].class_names
    if typed and data_classes is not None and tuple(n.lower() for n in data_classes) != card_classes:
        logger.warning(
            "data classes %s differ from the model's %s: scoring without classes", data_classes, card_classes
        )
        typed = False
    options = [{**card_postprocess(model.card), **setting} for setting in settings]
    pairs: list[list[tuple]] = [[] for _ in options]
    for im in tqdm(images, disable=not progress, desc=Path(data).name):
        maps = predict_image_maps(model, im.image, im.mpp)
        for found, option in zip(pairs, options, strict=True):
            labels, types = instances_from_maps(maps, model.card.mpp, option)
            found.append((labels, types if typed else None, im.inst, im.types if typed else None))
    return [
        {
            "model": str(model_path),
            "data": str(data),
            "postprocess": option,
            **evaluate_dataset(
                found,
                radius=radius_for_mpp(images[0].mpp),
                class_names=[c.name for c in model.card.classes] if typed else None,
                image_names=[im.name for im in images],
            ),
        }
        for found, option in zip(pairs, options, strict=True)
    ]
