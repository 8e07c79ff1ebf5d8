"""Score an exported model on annotated images: ``hoverserve model evaluate MODEL DATA...``.

The model runs exactly as in a slide job (ONNX Runtime, the card's resolution, tiles of its output
size, its family's post-processing through :func:`worker.families.runner_for` with the card's
options); only the context around an image differs: a slide has real neighbours, an annotated
image is reflected at its border. Predictions are scored at the data's own resolution (labels
resized by nearest neighbour when the model works coarser or traces on a finer grid), so numbers
compare with published ones on the same data.

Data sets: the layouts :func:`models.datasets.read_labelled` reads.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from models.card import ModelCard
from models.datasets import read_labelled
from models.evaluate import evaluate_dataset, radius_for_mpp
from worker.families import job_options, runner_for
from worker.infer import Model, load_model, predict_maps
from worker.plan import Box

__all__ = [
    "ImageMaps",
    "card_postprocess",
    "evaluate_model",
    "instances_from_maps",
    "nuclei_from_maps",
    "option_keys",
    "predict_image_maps",
    "predict_instances",
    "sweep_postprocess",
]

logger = logging.getLogger(__name__)


def _resize(image: NDArray, shape: tuple[int, int], interpolation: int) -> NDArray:
    return cv2.resize(image, (shape[1], shape[0]), interpolation=interpolation)


@dataclass(frozen=True)
class ImageMaps:
    """A model's maps for one image, at the model's resolution, cut to the image's extent."""

    arrays: Mapping[str, NDArray]
    """The family's maps (:class:`worker.families.MapSpec` names), ``(lead…, h, w)`` each."""
    shape: tuple[int, int]
    """The image's own (height, width), where labels are scored."""


def predict_image_maps(model: Model, image: NDArray[np.uint8], mpp: float) -> ImageMaps:
    """Run ``model`` on one RGB image at ``mpp`` µm/px.

    The image is resampled to the model's resolution (area averaging when shrinking), reflected
    by the network margin (whole-box families: padded with white), tiled and run exactly as slide
    regions are.
    """
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
    # A detector would find the mirrored nuclei of a reflected border (and report their cut
    # halves inside the image): whole-box families get white, as beyond a slide's edge.
    border = ({"borderType": cv2.BORDER_CONSTANT, "value": (255, 255, 255)} if model.runner.whole_box
              else {"borderType": cv2.BORDER_REFLECT_101})
    padded: NDArray[np.uint8] = cv2.copyMakeBorder(  # type: ignore[assignment]
        np.ascontiguousarray(small), pad, pad + rows - size[0], pad, pad + cols - size[1], **border)
    maps = predict_maps(model, padded, maps_box.grow(pad), maps_box)
    arrays = {name: array[..., : size[0], : size[1]] for name, array in maps.arrays.items()}
    return ImageMaps(arrays=arrays, shape=(height, width))


def nuclei_from_maps(
    maps: ImageMaps, card: ModelCard, options: Any, *, typed: bool
) -> tuple[NDArray[np.int32], dict[int, tuple[int, float]]]:
    """Post-processing of ``maps`` (made at the card's resolution) as a slide job does it.

    Parameters
    ----------
    maps : ImageMaps
        The maps of one image.
    card : ModelCard
        The model's card: its family picks the post-processing (:func:`worker.families.runner_for`).
    options : HoverOptions or BoundaryOptions
        The family's typed options (``card.options``, or a variant of them).
    typed : bool
        Whether the model classifies (else every nucleus has type 0).

    Returns
    -------
    tuple
        A label map at the image's size (nearest neighbour where the grids differ) and each
        label's (type, class probability).
    """
    found = runner_for(card).segment(maps.arrays, mpp=card.mpp, options=options, typed=typed)
    labels = found.labels.astype(np.int32)
    if labels.shape != maps.shape:
        labels = _resize(labels, maps.shape, cv2.INTER_NEAREST)
    return labels, {int(n.label): (int(n.type), float(n.type_prob)) for n in found.nuclei}


def instances_from_maps(
    maps: ImageMaps, card: ModelCard, options: Any, *, typed: bool
) -> tuple[NDArray[np.int32], dict[int, int]]:
    """:func:`nuclei_from_maps` without the probabilities: labels and each label's type."""
    labels, nuclei = nuclei_from_maps(maps, card, options, typed=typed)
    return labels, {label: kind for label, (kind, _) in nuclei.items()}


def option_keys(card: ModelCard) -> tuple[str, ...]:
    """The post-processing options of the card's family (what a setting may override)."""
    return tuple(type(card.options).KEYS)


def card_postprocess(card: ModelCard) -> dict[str, Any]:
    """The post-processing options the card sets, as it wrote them (JSON-ready)."""
    return {k: card.postprocess[k] for k in option_keys(card) if k in card.postprocess}


def predict_instances(
    model: Model, image: NDArray[np.uint8], mpp: float
) -> tuple[NDArray[np.int32], dict[int, int]]:
    """Nuclei of one RGB image at ``mpp`` µm/px, as a job with the card's options finds them: a
    label map at the image's size, and types."""
    maps = predict_image_maps(model, image, mpp)
    return instances_from_maps(maps, model.card, job_options(model.card), typed=model.typed)


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


def _check_settings(card: ModelCard, settings: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Each setting as the card's typed options with it applied (ValueError for unknown keys or
    values the family refuses)."""
    keys = option_keys(card)
    for setting in settings:
        unknown = set(setting) - set(keys)
        if unknown:
            raise ValueError(f"unknown post-processing option(s) {sorted(unknown)}; known: {keys}")
    base = job_options(card)
    return [dataclasses.replace(base, **setting) for setting in settings]


def _with_options(model: Model, setting: Mapping[str, Any]) -> Model:
    """``model`` whose card carries ``setting`` in its post-processing (the same session)."""
    if not setting:
        return model
    tuned = copy.copy(model)
    tuned.card = model.card.model_copy(update={"postprocess": {**model.card.postprocess, **setting}})
    return tuned


def sweep_postprocess(
    model_path: str | Path,
    data: str | Path,
    settings: Sequence[Mapping[str, Any]],
    *,
    only: Sequence[str] = (),
    mpp: float | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Score a model under several post-processing settings, running the network once per image.

    Each setting overrides some of the card's options (for a hover model ``np_threshold``,
    ``marker_threshold``, ``upsample``); ``{}`` keeps the card's. Returns one
    :func:`evaluate_model`-style result per setting, in order: the way to choose a model's
    post-processing on held-out images of one's own.
    """
    from tqdm import tqdm

    model = load_model(model_path, device=device)  # type: ignore[arg-type]
    card = model.card
    options = _check_settings(card, settings)
    card_classes = tuple(c.name.lower() for c in card.classes)
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
    pairs: list[list[tuple]] = [[] for _ in options]
    # A whole-box family applies its options when it pastes the detections into maps, so each
    # setting predicts again; a dense family's maps serve every setting.
    tuned = [_with_options(model, s) for s in settings] if model.runner.whole_box else None
    for im in tqdm(images, disable=not progress, desc=Path(data).name):
        per_setting = ([predict_image_maps(m, im.image, im.mpp) for m in tuned] if tuned
                       else [predict_image_maps(model, im.image, im.mpp)] * len(options))
        for found, option, maps in zip(pairs, options, per_setting, strict=True):
            labels, types = instances_from_maps(maps, card, option, typed=model.typed)
            found.append((labels, types if typed else None, im.inst, im.types if typed else None))
    return [
        {
            "model": str(model_path),
            "data": str(data),
            "postprocess": {**card_postprocess(card), **setting},
            **evaluate_dataset(
                found,
                radius=radius_for_mpp(images[0].mpp),
                class_names=[c.name for c in card.classes] if typed else None,
                image_names=[im.name for im in images],
            ),
        }
        for found, setting in zip(pairs, settings, strict=True)
    ]
