"""TIAToolbox's HoVer-Net post-processing on map sets from disk (runs inside its own venv).

Started by ``bench/postprocess.py`` with ``bench/.venv-tiatoolbox/bin/python``; imports nothing
from HoVerServe. For each map set it times ``HoVerNet.postproc`` (TIAToolbox's tile
post-processing: ``_proc_np_hv`` watershed, ``get_instance_info`` per-instance measurement and
the conversion to column arrays) and writes the label image, per-instance types and timings.

Loading: ``tiatoolbox.models``, ``tiatoolbox.models.architecture`` and ``tiatoolbox.utils`` have
``__init__`` modules that import every engine and network of the toolbox (timm, torchvision,
transformers, huggingface_hub, ...). None of that is on the post-processing path, so those three
packages are registered as bare packages before the import; the modules that *are* imported
(``hovernet.py``, ``architecture/utils.py``, ``models_abc.py``, ``utils/misc.py`` and what they
import) are TIAToolbox's own files, unmodified.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
import types
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np


def import_hovernet() -> Any:
    """TIAToolbox's ``HoVerNet`` class without the package-level ``__init__`` imports."""
    import tiatoolbox

    root = Path(tiatoolbox.__path__[0])
    for name in ("tiatoolbox.models", "tiatoolbox.models.architecture", "tiatoolbox.utils"):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = package
    from tiatoolbox.models.architecture.hovernet import HoVerNet

    return HoVerNet


class StageTimer:
    """Wraps the two static stages of ``HoVerNet.postproc`` to time them and keep their results.

    ``postproc`` calls them through the class (``HoVerNet._proc_np_hv(...)``), so replacing the
    class attributes with timing wrappers measures exactly the calls it makes.
    """

    def __init__(self, hovernet: Any) -> None:
        self.seconds: dict[str, float] = {"proc_np_hv": 0.0, "get_instance_info": 0.0}
        self.info: dict = {}
        watershed = hovernet._proc_np_hv
        measure = hovernet.get_instance_info

        def timed_watershed(*args, **kwargs):
            start = time.perf_counter()
            out = watershed(*args, **kwargs)
            self.seconds["proc_np_hv"] += time.perf_counter() - start
            return out

        def timed_measure(pred_inst, pred_type=None, offset=(0, 0), **kwargs):
            kwargs["verbose"] = False  # no tqdm bar: its refreshes would be timed too
            start = time.perf_counter()
            out = measure(pred_inst, pred_type, offset, **kwargs)
            self.seconds["get_instance_info"] += time.perf_counter() - start
            self.info = out
            return out

        hovernet._proc_np_hv = staticmethod(timed_watershed)
        hovernet.get_instance_info = staticmethod(timed_measure)

    def reset(self) -> None:
        for key in self.seconds:
            self.seconds[key] = 0.0


def tia_inputs(folder: Path) -> list[np.ndarray]:
    """The map set in the layout ``postproc`` takes: what ``HoVerNet.infer_batch`` returns
    for one tile (HWC float32: np (H, W, 1), hv (H, W, 2), type index (H, W, 1))."""
    np_prob = np.load(folder / "np_prob.npy")
    hv = np.load(folder / "hv.npy")
    types_map = np.load(folder / "types.npy")
    return [
        np.ascontiguousarray(np_prob[..., None], dtype=np.float32),
        np.ascontiguousarray(np.moveaxis(hv, 0, -1), dtype=np.float32),
        types_map[..., None].astype(np.float32),
    ]


def run_one(model, timer: StageTimer, maps: list[np.ndarray], repeats: int) -> dict:
    """Time ``repeats`` calls of ``model.postproc`` on one map set (wall and process CPU time)."""
    totals, cpu, stages = [], [], []
    result = None
    for _ in range(repeats):
        timer.reset()
        start, start_cpu = time.perf_counter(), time.process_time()
        result = model.postproc(maps)
        totals.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        stages.append(dict(timer.seconds))
    if result is None:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    labels = np.asarray(result[0]["predictions"], dtype=np.int32)
    ids = np.array(sorted(timer.info), dtype=np.int64)
    kinds = np.array([timer.info[i]["type"] for i in sorted(timer.info)], dtype=np.int64)
    return {"seconds": totals, "cpu_seconds": cpu, "stages": stages, "labels": labels, "ids": ids,
            "types": kinds}


def versions() -> dict[str, str]:
    import cv2
    import scipy
    import tiatoolbox
    import torch

    return {
        "python": platform.python_version(), "tiatoolbox": tiatoolbox.__version__,
        "numpy": np.__version__, "scipy": scipy.__version__, "scikit-image": version("scikit-image"),
        "opencv": cv2.__version__, "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TIAToolbox HoVer-Net post-processing timings")
    parser.add_argument("folders", type=Path, nargs="+", help="map set folders (maps_<size>)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--repeats", type=int, nargs="+", default=[3],
                        help="runs per map set: one number for all, or one per folder")
    args = parser.parse_args(argv)
    if len(args.repeats) == 1:
        args.repeats *= len(args.folders)
    if len(args.repeats) != len(args.folders) or min(args.repeats) < 1:
        parser.error("--repeats takes one number >= 1, or one per folder")
    args.out.mkdir(parents=True, exist_ok=True)

    hovernet = import_hovernet()
    timer = StageTimer(hovernet)
    # postproc is a bound method; the network's weights are never used. num_types only decides
    # whether a type branch exists, which postproc does not look at.
    model = hovernet(num_types=5, mode="fast")
    warm = tia_inputs(args.folders[0])
    run_one(model, timer, [m[:256, :256] for m in warm], 1)  # first-call imports and caches

    report: dict = {"side": "tiatoolbox", "versions": versions(), "sets": {}}
    for folder, repeats in zip(args.folders, args.repeats, strict=True):
        maps = tia_inputs(folder)
        run = run_one(model, timer, maps, repeats)
        seconds, stages = run["seconds"], run["stages"]
        name = folder.name
        np.save(args.out / f"{name}_labels.npy", run["labels"])
        np.savez(args.out / f"{name}_types.npz", ids=run["ids"], types=run["types"])
        report["sets"][name] = {
            "shape": list(maps[0].shape[:2]), "seconds": seconds, "cpu_seconds": run["cpu_seconds"],
            "stages": stages,
            "nuclei": len(run["ids"]),
        }
        print(f"tiatoolbox {name}: {min(seconds):.3f} s (min of {len(seconds)}), "
              f"{len(run['ids'])} nuclei", flush=True)
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (args.out / "tiatoolbox.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
