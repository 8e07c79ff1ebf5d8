"""Realistic HoVer-Net output maps built from real nucleus annotations, written to disk.

Both sides of the post-processing benchmark (HoVerServe and TIAToolbox) read the same files, so
neither pays for making them and both see bit-identical inputs.

How a map set is made:

1. A square mosaic of real annotated 256×256 CoNSeP patches (40×, 0.25 µm/px; instance ids and
   the 4-class type map) in a seeded random order. Instances keep their shapes; patch seams cut
   some of them, as the original random crops already did.
2. ``hv``: the exact HoVer-Net training target, i.e. for every instance the column (x) and row
   (y) distance of each pixel from the instance's centre of mass, negative and positive halves
   each scaled to reach -1 and 1 within the instance; then a light blur and noise, because a
   network's output is smooth and never exact.
3. ``np_prob``: the blurred nucleus mask with an offset and noise, so it is a probability map and
   not a binary image.
4. ``types``: the per-pixel argmax (uint8) of noisy, blurred one-hot class scores, which is what
   both HoVerServe's pipeline and TIAToolbox's ``infer_batch`` hand to their post-processing.

Layout of one map set (``maps_<size>/``): ``np_prob.npy`` (H, W) float32, ``hv.npy`` (2, H, W)
float32, ``types.npy`` (H, W) uint8, ``gt_inst.npy`` (H, W) int32, ``gt_types.npy`` (H, W) uint8
and ``meta.json``.

Run ``python bench/make_maps.py --sizes 1024 2048 4096 --out bench/work/maps``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

__all__ = [
    "MAP_FILES",
    "MODEL_MAP_FILES",
    "MapSet",
    "hv_targets",
    "load_map_set",
    "load_patches",
    "mosaic",
    "noisy_maps",
    "write_map_set",
    "write_model_maps",
]

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
"""The project's shared data folder (read-only, beside the repository)."""

PATCH_SOURCES = (
    SHARED / "data" / "nuclei" / "consep_train" / "labels.npz",
    SHARED / "data" / "nuclei" / "consep_patches_train.npz",
)
"""Annotated CoNSeP patches (``inst`` and ``type_map``, 256×256, 0.25 µm/px)."""

N_CLASSES = 5
"""CoNSeP merged scheme: background, other, inflammatory, epithelial, spindle."""

MAP_FILES = ("np_prob.npy", "hv.npy", "types.npy", "gt_inst.npy", "gt_types.npy", "meta.json")
"""Files of one map set."""


@dataclass(frozen=True)
class MapSet:
    """One set of maps as read back from disk."""

    np_prob: NDArray[np.float32]
    hv: NDArray[np.float32]
    types: NDArray[np.uint8]
    gt_inst: NDArray[np.int32]
    gt_types: NDArray[np.uint8]
    meta: dict

    @property
    def shape(self) -> tuple[int, int]:
        return self.np_prob.shape


def load_patches(sources: tuple[Path, ...] = PATCH_SOURCES) -> tuple[NDArray[np.int32], NDArray[np.uint8]]:
    """All annotated patches of ``sources``: instance ids (N, h, w) int32 and types (N, h, w) uint8."""
    insts, types = [], []
    for path in sources:
        with np.load(path) as data:
            insts.append(data["inst"].astype(np.int32, copy=False))
            types.append(data["type_map"].astype(np.uint8, copy=False))
    return np.concatenate(insts), np.concatenate(types)


def mosaic(
    insts: NDArray[np.integer],
    types: NDArray[np.integer],
    size: int,
    *,
    seed: int = 0,
) -> tuple[NDArray[np.int32], NDArray[np.uint8]]:
    """Tile annotated patches into a ``size``×``size`` mosaic with unique instance ids.

    Parameters
    ----------
    insts : (N, h, w) integer ndarray
        Instance ids per patch, 0 background; ids need not be consecutive.
    types : (N, h, w) integer ndarray
        Class per pixel.
    size : int
        Side of the mosaic, pixels; the last row and column of patches are cropped to fit.
    seed : int
        Seed of the patch order (patches are used without repetition while they last).

    Returns
    -------
    inst : (size, size) int32 ndarray
        Ids 1..n (consecutive), 0 background.
    type_map : (size, size) uint8 ndarray
        Class per pixel, 0 outside nuclei.
    """
    if insts.ndim != 3 or insts.shape != types.shape or len(insts) == 0:
        raise ValueError(
            f"insts and types must be equal (N, h, w) stacks, got {insts.shape} and {types.shape}"
        )
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    h, w = insts.shape[1:]
    rows, cols = math.ceil(size / h), math.ceil(size / w)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(insts)) for _ in range(math.ceil(rows * cols / len(insts)))])
    inst = np.zeros((rows * h, cols * w), np.int64)
    type_map = np.zeros((rows * h, cols * w), np.uint8)
    offset = 0
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        patch = insts[order[k]]
        ids, dense = np.unique(patch, return_inverse=True)
        # np.unique sorts: with background present it is index 0 and nuclei are 1..m already.
        dense = dense.reshape(patch.shape) + (0 if ids[0] == 0 else 1)
        nucleus = patch > 0
        window = (slice(r * h, (r + 1) * h), slice(c * w, (c + 1) * w))
        inst[window] = np.where(nucleus, dense + offset, 0)
        type_map[window] = np.where(nucleus, types[order[k]], 0)
        offset += int(dense.max())
    inst = inst[:size, :size]
    type_map = type_map[:size, :size]
    # Cropping the last patches can remove whole instances: renumber to 1..n.
    present, inverse = np.unique(inst, return_inverse=True)
    relabelled: NDArray[np.int32] = inverse.reshape(inst.shape).astype(np.int32)
    if present[0] != 0:
        relabelled += 1
    return relabelled, type_map


def hv_targets(inst: NDArray[np.integer]) -> NDArray[np.float32]:
    """Exact HoVer-Net horizontal/vertical maps of an instance image.

    Parameters
    ----------
    inst : (H, W) integer ndarray
        Instance ids, 0 background.

    Returns
    -------
    (2, H, W) float32 ndarray
        Channel 0: column distance from the instance's centre of mass, channel 1: row distance;
        negative values divided by the instance's most negative one and positive values by its
        largest, so each instance spans -1..1 (a one-pixel-wide instance is 0 across). 0 outside.
    """
    if inst.ndim != 2:
        raise ValueError(f"inst must be (H, W), got shape {inst.shape}")
    hv = np.zeros((2, *inst.shape), np.float32)
    flat = np.flatnonzero(inst)
    if flat.size == 0:
        return hv
    label = inst.ravel()[flat].astype(np.intp)
    n = int(label.max()) + 1
    count = np.bincount(label, minlength=n).astype(np.float64)
    row, col = np.divmod(flat, inst.shape[1])
    for channel, coord in enumerate((col, row)):
        centre = np.bincount(label, coord, minlength=n) / np.maximum(count, 1)
        d = coord - centre[label]
        low = np.zeros(n)
        high = np.zeros(n)
        np.minimum.at(low, label, d)
        np.maximum.at(high, label, d)
        scale = np.where(d < 0, -low[label], high[label])
        hv[channel].ravel()[flat] = np.divide(d, scale, out=np.zeros_like(d), where=scale > 0)
    return hv


def noisy_maps(
    inst: NDArray[np.integer],
    type_map: NDArray[np.integer],
    *,
    seed: int = 0,
    n_classes: int = N_CLASSES,
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.uint8]]:
    """Network-like ``np_prob`` (H, W), ``hv`` (2, H, W) float32 and ``types`` (H, W) uint8.

    The noise is mild: the blurred mask thresholded at 0.5 is the annotation up to a pixel at
    the edges, so post-processing finds nearly every annotated nucleus.
    """
    if inst.shape != type_map.shape or inst.ndim != 2:
        raise ValueError(f"inst and type_map must be equal (H, W), got {inst.shape} and {type_map.shape}")
    rng = np.random.default_rng(seed)
    shape = inst.shape
    mask = (inst > 0).astype(np.float32)
    np_prob = cv2.GaussianBlur(mask, (0, 0), 1.0)
    np_prob = 0.03 + 0.94 * np_prob + 0.04 * rng.standard_normal(shape, dtype=np.float32)
    np.clip(np_prob, 0.0, 1.0, out=np_prob)

    hv = hv_targets(inst)
    for channel in range(2):
        hv[channel] = cv2.GaussianBlur(hv[channel], (0, 0), 0.8)
    hv += 0.03 * rng.standard_normal(hv.shape, dtype=np.float32)
    np.clip(hv, -1.0, 1.0, out=hv)

    classes = np.where(inst > 0, type_map, 0).astype(np.intp)
    best = np.full(shape, -np.inf, np.float32)
    types = np.zeros(shape, np.uint8)
    # One channel at a time keeps memory at a few (H, W) planes however many classes there are.
    for k in range(n_classes):
        score = cv2.GaussianBlur((classes == k).astype(np.float32), (0, 0), 1.0)
        score += 0.15 * rng.standard_normal(shape, dtype=np.float32)
        better = score > best
        best[better] = score[better]
        types[better] = k
    return np_prob.astype(np.float32, copy=False), hv, types


def write_map_set(
    directory: str | Path,
    size: int,
    *,
    seed: int = 0,
    patches: tuple[NDArray[np.int32], NDArray[np.uint8]] | None = None,
) -> Path:
    """Make one ``size``×``size`` map set and write it to ``directory/maps_<size>/``.

    Returns the folder. ``patches`` (from :func:`load_patches`) defaults to the shared CoNSeP data.
    """
    insts, types = patches if patches is not None else load_patches()
    inst, type_map = mosaic(insts, types, size, seed=seed)
    np_prob, hv, pixel_types = noisy_maps(inst, type_map, seed=seed + 1)
    folder = Path(directory) / f"maps_{size}"
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "np_prob.npy", np_prob)
    np.save(folder / "hv.npy", hv)
    np.save(folder / "types.npy", pixel_types)
    np.save(folder / "gt_inst.npy", inst)
    np.save(folder / "gt_types.npy", type_map)
    meta = {
        "size": size, "seed": seed, "mpp": 0.25, "gt_nuclei": int(inst.max()),
        "patch_size": list(insts.shape[1:]), "patches_available": len(insts),
        "source": "CoNSeP annotated patches (shared/data/nuclei), 0.25 µm/px",
        "n_classes": N_CLASSES,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


MODEL_MAP_FILES = ("np_prob.npy", "hv.npy", "types.npy", "meta.json")
"""Files of a map set made by a real model (no annotation)."""

DEFAULT_SLIDE = SHARED / "data" / "slides" / "CMU-1-Small-Region.svs"


def write_model_maps(
    directory: str | Path,
    *,
    slide: str | Path = DEFAULT_SLIDE,
    model: str | Path | None = None,
    size: int = 1024,
    origin: tuple[int, int] = (600, 900),
) -> Path:
    """A real model's maps of one ``size``² region of a slide (level 0, read as is), written to
    ``directory/model_<slide stem>_<size>/`` like a map set, without annotation. The region is
    ``size`` rounded up to whole network tiles, ``origin`` down to their grid.

    ``model`` defaults to the bundled default model; ``origin`` is the region's (x, y) on level
    0. ``meta.json`` keeps the model's µm/px and its card's ``upsample``.
    """
    import openslide

    from models.zoo import default_model
    from worker.infer import load_model, predict_maps
    from worker.plan import Box

    path = Path(model) if model is not None else default_model()
    if path is None:
        raise FileNotFoundError("no default model in models/zoo; pass model=")
    net = load_model(path, device="cpu")
    margin = net.card.margin
    # The region is whole network tiles on the slide's tile grid: ``size`` rounded up and the
    # origin down to the model's output size.
    tile = net.card.output_size
    requested, size = size, -(-size // tile) * tile
    x, y = (v // tile * tile for v in origin)
    maps_box = Box(row0=y, col0=x, row1=y + size, col1=x + size)
    image_box = maps_box.grow(margin)
    with openslide.OpenSlide(str(slide)) as handle:
        region = handle.read_region((image_box.col0, image_box.row0), 0,
                                    (image_box.width, image_box.height))
    image = np.asarray(region.convert("RGB"), np.uint8)
    maps = predict_maps(net, image, image_box, maps_box)
    if maps.get("types") is None:
        raise ValueError(f"{path.name} is untyped; the benchmark needs a typed model")
    folder = Path(directory) / f"model_{Path(slide).stem}_{requested}"
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "np_prob.npy", maps["np_prob"])
    np.save(folder / "hv.npy", maps["hv"])
    np.save(folder / "types.npy", maps["types"])
    meta = {"size": size, "mpp": net.card.mpp, "model": path.name, "slide": Path(slide).name,
            "origin_xy": [x, y], "upsample": net.card.options.grid_scale,
            "source": "model"}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_map_set(folder: str | Path) -> MapSet:
    """Read a map set written by :func:`write_map_set` (fully into memory)."""
    folder = Path(folder)
    return MapSet(
        np_prob=np.load(folder / "np_prob.npy"),
        hv=np.load(folder / "hv.npy"),
        types=np.load(folder / "types.npy"),
        gt_inst=np.load(folder / "gt_inst.npy"),
        gt_types=np.load(folder / "gt_types.npy"),
        meta=json.loads((folder / "meta.json").read_text()),
    )


def map_set_complete(folder: str | Path) -> bool:
    """Whether every file of a map set is present."""
    return all((Path(folder) / name).is_file() for name in MAP_FILES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048, 4096])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "work" / "maps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rewrite existing map sets")
    parser.add_argument("--model-maps", type=int, nargs="*", default=[], metavar="SIZE",
                        help="also the default model's maps of a SIZE² region of CMU-1-Small-Region")
    args = parser.parse_args(argv)
    for size in args.model_maps:
        folder = args.out / f"model_{DEFAULT_SLIDE.stem}_{size}"
        if all((folder / n).is_file() for n in MODEL_MAP_FILES) and not args.force:
            print(f"{folder}: exists")
        else:
            print(f"{write_model_maps(args.out, size=size)}: the default model's maps")
    patches = load_patches() if args.sizes else None
    for size in args.sizes:
        folder = args.out / f"maps_{size}"
        if map_set_complete(folder) and not args.force:
            print(f"{folder}: exists")
            continue
        write_map_set(args.out, size, seed=args.seed, patches=patches)
        meta = json.loads((folder / "meta.json").read_text())
        print(f"{folder}: {size}×{size}, {meta['gt_nuclei']} annotated nuclei")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
