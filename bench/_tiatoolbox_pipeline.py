"""TIAToolbox's own HoVer-Net pipeline on one region of a slide (runs inside its own venv).

Started by ``bench/tiatoolbox_end_to_end.py`` with ``bench/.venv-tiatoolbox-engine/bin/python``;
imports nothing from HoVerServe. It builds TIAToolbox's ``HoVerNet(num_types, mode="fast")``,
loads an official-format checkpoint into it (``torch.load(path)["desc"]``, strict), and runs
TIAToolbox's ``MultiTaskSegmentor`` engine in WSI mode on the slide with a mask that is one
exactly over the requested region, so the engine infers only the patches whose output touches
the region (its own patch grid, filtering and stitching), post-processes the stitched maps
(its tiles, margins and dask workers) and writes its zarr output (box, centroid, contour,
probability and type of every nucleus; its ``AnnotationStore`` output needs SQLite with
loadable extensions, which this machine's Python lacks). The IO configuration is the one of
TIAToolbox's pretrained ``hovernet_fast-pannuke`` (0.25 µm/px, 256 → 164 px patches at
stride 164, 1024² tiles with a 128 px margin). Everything happens in one process run; the
parent measures wall time and the RSS of the process tree from outside.

Writes a JSON file: seconds per stage (imports, model load, the engine's ``infer_wsi``,
``post_process_wsi``, ``save_predictions`` and the whole ``run``), patches inferred, nuclei
written, their centroids (level-0 px), the process's peak RSS (``ru_maxrss``, children
included separately) and the versions used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

MASK_DOWNSAMPLE = 16
"""The mask is this many times smaller than level 0 (ROI corners must be multiples of it)."""


def roi_mask(height: int, width: int, roi: tuple[int, int, int, int]) -> Any:
    """A uint8 mask of the slide at 1/:data:`MASK_DOWNSAMPLE`, one exactly over ``roi``."""
    import numpy as np

    x, y, w, h = roi
    if any(v % MASK_DOWNSAMPLE for v in roi):
        raise ValueError(f"roi values must be multiples of {MASK_DOWNSAMPLE}, got {list(roi)}")
    if height % MASK_DOWNSAMPLE or width % MASK_DOWNSAMPLE:
        raise ValueError(f"slide sides must be multiples of {MASK_DOWNSAMPLE}, got {width}×{height}")
    mask = np.zeros((height // MASK_DOWNSAMPLE, width // MASK_DOWNSAMPLE), dtype=np.uint8)
    d = MASK_DOWNSAMPLE
    mask[y // d:(y + h) // d, x // d:(x + w) // d] = 1
    return mask


def io_config(module: Any) -> Any:
    """TIAToolbox's pretrained ``hovernet_fast-pannuke`` IO configuration."""
    resolution = {"units": "mpp", "resolution": 0.25}
    return module.IOInstanceSegmentorConfig(
        input_resolutions=[resolution], output_resolutions=[resolution] * 3, margin=128,
        tile_shape=[1024, 1024], patch_input_shape=[256, 256], patch_output_shape=[164, 164],
        stride_shape=[164, 164], save_resolution=resolution)


class Timers:
    """Wraps engine methods on the instance (the class is untouched) to time each call."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, obj: Any, name: str) -> None:
        method = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        setattr(obj, name, timed)


def centroids(zarr_path: Path) -> list[list[float]]:
    """Centroid (x, y, level-0 px) of every nucleus the engine wrote to its zarr output."""
    import numpy as np
    import zarr

    group = zarr.open_group(str(zarr_path), mode="r")
    if "centroid" not in group:
        return []
    array: Any = group["centroid"]
    points = np.asarray(array[...], dtype=np.float64).reshape(-1, 2)
    return points.tolist()


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    from tiatoolbox.models.architecture.hovernet import HoVerNet  # type: ignore[import-not-found]
    from tiatoolbox.models.engine import io_config as io_module  # type: ignore[import-not-found]
    from tiatoolbox.models.engine.multi_task_segmentor import MultiTaskSegmentor  # type: ignore[import-not-found]
    from tiatoolbox.wsicore.wsireader import WSIReader  # type: ignore[import-not-found]

    imported = time.perf_counter()
    model = HoVerNet(num_types=args.num_types, mode="fast")
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["desc"], strict=True)
    model.eval()
    loaded = time.perf_counter()
    width, height = (int(v) for v in WSIReader.open(args.slide).info.slide_dimensions)
    mask = roi_mask(height, width, tuple(args.roi))
    engine = MultiTaskSegmentor(model=model, batch_size=args.batch_size,
                                num_workers=args.num_workers, device="cpu", verbose=False)
    timers = Timers()
    for name in ("infer_wsi", "post_process_wsi", "save_predictions"):
        timers.wrap(engine, name)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    output = engine.run([args.slide], masks=[mask], patch_mode=False, ioconfig=io_config(io_module),
                        save_dir=args.work, overwrite=True, output_type="zarr",
                        auto_get_mask=False)
    run_seconds = time.perf_counter() - start
    if isinstance(output, dict):  # {slide: output path}
        output = next(iter(output.values()))
    store_path = Path(output)
    points = centroids(store_path)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "side": "tiatoolbox",
        "seconds": {"imports": imported - started, "load_model": loaded - imported,
                    "run": run_seconds, **timers.seconds,
                    "total_in_process": time.perf_counter() - started},
        "patches": len(engine.dataloader.dataset),
        "nuclei": len(points), "centroids": points, "store": str(store_path),
        "ru_maxrss_mb": own, "children_ru_maxrss_mb": children,
        "threads": torch.get_num_threads(), "num_workers": engine.num_workers,
        "versions": {"python": platform.python_version(), "tiatoolbox": version("tiatoolbox"),
                     "torch": torch.__version__, "numpy": version("numpy"),
                     "scikit-image": version("scikit-image"), "opencv": version("opencv-python"),
                     "dask": version("dask")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--roi", type=int, nargs=4, required=True, metavar=("X", "Y", "W", "H"))
    parser.add_argument("--num-types", type=int, default=6)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0,
                        help="the engine's num_workers (0: its default, every core for post-processing)")
    parser.add_argument("--work", type=Path, required=True, help="folder for the engine's output")
    parser.add_argument("--result", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    result = run(args)
    args.result.write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
