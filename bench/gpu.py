"""The GPU benchmark in one command: s/mm² of 40× tissue and GPU utilisation on a CUDA machine.

Run ``python bench/gpu.py OUT_DIR [--wheels DIR] [--hovernet CHECKPOINT]``. In order it:

1. stops with one line and exit status 3 when the machine has no NVIDIA GPU (no working
   ``nvidia-smi``);
2. with ``--wheels DIR``, makes a virtual environment (``bench/work/gpu-venv``, seeing the
   image's own packages) and installs every wheel of ``DIR`` into it with
   ``pip install --no-index --find-links DIR`` (``--no-venv``: into the running environment),
   then runs itself again inside it;
3. checks that ONNX Runtime offers, and really starts, a CUDA or TensorRT provider (exit 4 if not);
4. builds the 40× test slide (``bench/make_big_slide.py``) unless it exists;
5. runs ``hoverserve infer SLIDE --device cuda --trt-cache DIR`` for the bundled default model
   and, given ``--hovernet`` (an official HoVer-Net fast checkpoint, imported here with
   ``hoverserve model import``, or an already imported ``.onnx``), for that model too, sampling
   ``nvidia-smi`` every 0.5 s while each runs; with ``--fp16``, also for each model's float16
   variant (``hoverserve model fp16``, checked against float32 on ``--fp16-image``, on the CPU
   unless ``--fp16-check-device cuda``; a variant that fails its check is a failed row giving
   the reason). TensorRT's engines are kept in ``--trt-cache`` (default
   ``bench/work/trt-cache``), so only the first run builds them;
6. writes ``OUT_DIR/gpu.json`` and ``OUT_DIR/gpu.md`` (a markdown table); the runs' own outputs
   stay in ``bench/work/gpu/``.

s/mm² is the run's wall time (start-up, planning, reading, inference, post-processing, writing)
over the tissue area ``counts.json`` reports; the inference-only figure uses the manifest's
``infer`` timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import site
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / "work"
DEFAULT_VENV = WORK / "gpu-venv"
RUNS = WORK / "gpu"
"""Where the runs' outputs and an imported HoVer-Net model go (git-ignored, unlike OUT_DIR)."""
SAMPLE_SECONDS = 0.5
"""Interval of the nvidia-smi sampling, seconds."""
TRT_CACHE = WORK / "trt-cache"
"""Default folder of TensorRT's engines (``hoverserve infer --trt-cache``)."""
FP16_IMAGE = ROOT.parent / "shared" / "data" / "nuclei" / "tnbc" / "images" / "tnbc_01_1.png"
FP16_IMAGE_MPP = 0.25
"""Default image the fp16 variants are checked on (real H&E at 40×, ~90 nuclei)."""

_GPU_QUERY = ("nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits")
_EXIT_NO_GPU, _EXIT_NO_PROVIDER, _EXIT_SETUP = 3, 4, 5

__all__ = [
    "GpuSampler",
    "ModelRun",
    "detect_gpu",
    "fp16_variant",
    "markdown_table",
    "parse_gpu_sample",
    "write_report",
]


class SetupError(Exception):
    """Something the benchmark needs is missing: reported in one line, never a traceback."""

    def __init__(self, message: str, *, code: int = _EXIT_SETUP) -> None:
        super().__init__(message)
        self.code = code


def detect_gpu() -> list[str]:
    """Names of the NVIDIA GPUs ``nvidia-smi`` lists (empty when there is none or no driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    if done.returncode != 0:
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def parse_gpu_sample(text: str) -> tuple[float, float] | None:
    """(utilisation %, memory used MiB) of the first GPU in one ``nvidia-smi`` csv answer, or
    ``None`` when it cannot be read (``[N/A]``, empty)."""
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) < 2:
            continue
        try:
            return float(parts[0]), float(parts[1])
        except ValueError:
            return None
    return None


class GpuSampler:
    """Samples GPU utilisation and memory on a thread while a run goes on (a context manager)."""

    def __init__(self, interval: float = SAMPLE_SECONDS) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                done = subprocess.run(list(_GPU_QUERY), capture_output=True, text=True,
                                      timeout=10, check=False)
                sample = parse_gpu_sample(done.stdout) if done.returncode == 0 else None
            except (OSError, subprocess.SubprocessError):
                sample = None
            if sample is not None:
                self.samples.append(sample)
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float | None]:
        """Mean and max utilisation (%) and max memory used (MiB); ``None`` without samples."""
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_max": None, "gpu_mem_max_mib": None}
        utils = [u for u, _ in self.samples]
        return {"gpu_util_mean": sum(utils) / len(utils), "gpu_util_max": max(utils),
                "gpu_mem_max_mib": max(m for _, m in self.samples)}


@dataclass
class ModelRun:
    """One model's run on the test slide."""

    model: str
    returncode: int
    wall_s: float
    tissue_mm2: float | None = None
    s_per_mm2: float | None = None
    infer_s_per_mm2: float | None = None
    nuclei: int | None = None
    peak_rss_mb: float | None = None
    gpu_util_mean: float | None = None
    gpu_util_max: float | None = None
    gpu_mem_max_mib: float | None = None
    gpu_samples: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    error: str = ""


def _fmt(value: Any, digits: int) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def markdown_table(result: dict[str, Any]) -> str:
    """The benchmark's result (as written to ``gpu.json``) as a markdown section."""
    slide = result.get("slide", {})
    lines = [
        f"## GPU: `hoverserve infer --device {result.get('device', 'cuda')}` on a 40× slide "
        "(`bench/gpu.py`)",
        "",
        f"GPU: {', '.join(result.get('gpus', [])) or 'unknown'}; ONNX Runtime providers: "
        f"{', '.join(result.get('providers', [])) or 'unknown'}; {result.get('date', '')}.",
        f"Slide: `{slide.get('name', '?')}`, {slide.get('width', '?')}×{slide.get('height', '?')} px "
        f"at {slide.get('mpp', '?')} µm/px. s/mm² = wall time of the whole run over the tissue "
        "area; GPU utilisation sampled every 0.5 s with nvidia-smi.",
        "",
        "| model | tissue mm² | nuclei | wall s | s/mm² | inference s/mm² | GPU util mean % "
        "| GPU util max % | GPU memory max MiB | peak RSS MB |",
        "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in result.get("runs", []):
        if run.get("returncode", 1) != 0:
            lines.append(f"| {run.get('model', '?')} | failed: {run.get('error', '')} "
                         "| | | | | | | | |")
            continue
        lines.append(
            f"| {run['model']} | {_fmt(run.get('tissue_mm2'), 2)} | {_fmt(run.get('nuclei'), 0)} "
            f"| {_fmt(run.get('wall_s'), 1)} | **{_fmt(run.get('s_per_mm2'), 3)}** "
            f"| {_fmt(run.get('infer_s_per_mm2'), 3)} | {_fmt(run.get('gpu_util_mean'), 0)} "
            f"| {_fmt(run.get('gpu_util_max'), 0)} | {_fmt(run.get('gpu_mem_max_mib'), 0)} "
            f"| {_fmt(run.get('peak_rss_mb'), 0)} |"
        )
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``gpu.json`` and ``gpu.md`` into ``out_dir`` (created); return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "gpu.json", out_dir / "gpu.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown_table(result))
    return json_path, md_path


# --------------------------------------------------------------------------- setup


def _pip(python: Path | str, wheels: Path) -> None:
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    if not files:
        raise SetupError(f"no .whl files in {wheels}")
    if any(Path(f).name.startswith("onnxruntime_gpu") for f in files):
        # The CPU package provides the same module and would shadow the GPU one.
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "onnxruntime"],
                       check=False, capture_output=True)
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index",
                           "--find-links", str(wheels), *files], check=False)
    if done.returncode != 0:
        raise SetupError(f"pip could not install the wheels of {wheels} (exit {done.returncode})")


def _inherit_packages(python: Path) -> None:
    """Let the new environment see the running one's packages after its own: started from a
    virtual environment, ``--system-site-packages`` alone would see only the base Python's."""
    done = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SetupError(f"{python} does not run: {done.stderr.strip()[-200:]}")
    paths = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(done.stdout.strip()) / "hoverserve-parent.pth").write_text("\n".join(paths) + "\n")


def _reexec_in_venv(venv: Path, wheels: Path, argv: Sequence[str]) -> int:
    python = venv / "bin" / "python"
    if not python.is_file():
        done = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                              check=False)
        if done.returncode != 0:
            raise SetupError(f"could not create the virtual environment {venv}")
        _inherit_packages(python)
    _pip(python, wheels)
    return subprocess.run([str(python), str(Path(__file__).resolve()), *argv],
                          check=False).returncode


def _check_providers(model: Path) -> list[str]:
    """The GPU providers an ONNX Runtime session on ``model`` really starts with."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise SetupError(f"onnxruntime is not installed ({exc}); pass --wheels DIR") from exc
    from worker.errors import InferenceError
    from worker.infer import select_providers

    available = list(ort.get_available_providers())
    try:
        chosen = select_providers("cuda", available)
    except InferenceError as exc:
        raise SetupError(str(exc), code=_EXIT_NO_PROVIDER) from exc
    # A listed CUDA provider whose libraries (cuDNN, cuBLAS) do not load falls back to the CPU
    # quietly: start a session to see which providers it really got.
    trial = [p for p in chosen if p != "TensorrtExecutionProvider"]
    try:
        session = ort.InferenceSession(str(model), providers=trial)
    except Exception as exc:  # onnxruntime raises its own types for a provider that fails
        raise SetupError(f"ONNX Runtime cannot start {trial[0]} on {model.name}: {exc}",
                         code=_EXIT_NO_PROVIDER) from exc
    started = [p for p in session.get_providers() if p != "CPUExecutionProvider"]
    if not started:
        raise SetupError(f"ONNX Runtime lists {', '.join(available)} but a session on {model.name} "
                         "started on the CPU only (CUDA/cuDNN libraries missing?)",
                         code=_EXIT_NO_PROVIDER)
    return available


def _hoverserve() -> list[str]:
    return [sys.executable, "-m", "service.cli"]


def _import_hovernet(checkpoint: Path, types: str, work: Path) -> Path:
    if checkpoint.suffix == ".onnx":
        return checkpoint
    out = work / f"{checkpoint.stem.split('.')[0]}.onnx"
    if not out.is_file():
        done = subprocess.run([*_hoverserve(), "model", "import", str(checkpoint), "-o", str(out),
                               "--types", types], cwd=ROOT, check=False)
        if done.returncode != 0:
            raise SetupError(f"hoverserve model import {checkpoint} failed (exit {done.returncode})")
    return out


def fp16_variant(model: Path, image: Path, image_mpp: float, device: str, work: Path) -> Path | str:
    """``model``'s float16 variant, made and checked by ``hoverserve model fp16`` (kept in
    ``work``), or why it was not written (its check failed, or the command did)."""
    out = work / f"{model.stem}-fp16.onnx"
    if out.is_file():
        return out
    work.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([*_hoverserve(), "model", "fp16", str(model), "-o", str(out), "--image",
                           str(image), "--image-mpp", str(image_mpp), "--device", device],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.is_file():
        lines = (done.stderr or done.stdout).strip().splitlines()
        return f"fp16 variant not made: {lines[-1] if lines else f'exit {done.returncode}'}"
    return out


def _run_model(slide: Path, model: Path, out: Path, extra: Sequence[str], *,
               device: str = "cuda", label: str | None = None) -> ModelRun:
    import end_to_end

    with GpuSampler() as sampler:
        run = end_to_end.run_slide(end_to_end.Slide(slide), model, out,
                                   extra=["--device", device, *extra])
    name = run.model_name or model.stem
    result = ModelRun(model=f"{name} {label}" if label else name, returncode=run.returncode,
                      wall_s=run.wall_s, peak_rss_mb=run.peak_rss_mb, error=run.error,
                      timings=run.timings, nuclei=run.nuclei, tissue_mm2=run.tissue_mm2)
    summary = sampler.summary()
    result.gpu_util_mean, result.gpu_util_max = summary["gpu_util_mean"], summary["gpu_util_max"]
    result.gpu_mem_max_mib, result.gpu_samples = summary["gpu_mem_max_mib"], len(sampler.samples)
    if run.returncode == 0 and run.tissue_mm2:
        result.s_per_mm2 = run.wall_s / run.tissue_mm2
        if "infer" in run.timings:
            result.infer_s_per_mm2 = run.timings["infer"] / run.tissue_mm2
    return result


def _benchmark(args: argparse.Namespace, gpus: list[str]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(BENCH))
    from make_big_slide import build_slide

    from models.zoo import default_model
    from worker.errors import SlideError
    from worker.slide import open_slide

    model = args.model or default_model()
    if model is None:
        raise SetupError("no bundled default model in models/zoo: pass --model MODEL.onnx")
    # ``--device cpu`` (a dry run of the whole script) skips the provider check.
    providers = _check_providers(model) if args.device == "cuda" else []
    slide_path: Path = args.slide
    if not slide_path.is_file():
        print(f"building {slide_path} ({args.size}² px)…", file=sys.stderr)
        try:
            build_slide(slide_path, size=args.size)
        except (ValueError, OSError, SlideError) as exc:
            raise SetupError(f"cannot build the test slide {slide_path}: {exc}") from exc
    try:
        with open_slide(slide_path) as slide:
            height, width = slide.shape
            mpp = slide.mpp
    except SlideError as exc:
        raise SetupError(str(exc)) from exc
    models = [model]
    if args.hovernet is not None:
        models.append(_import_hovernet(args.hovernet, args.hovernet_types, RUNS / "models"))
    runs = []
    extra = [*(["--trt-cache", str(args.trt_cache)] if args.device == "cuda" else []), *args.extra]
    for path in models:
        variants: list[tuple[Path | str, str | None]] = [(path, None)]
        if args.fp16:
            variants.append((fp16_variant(path, args.fp16_image, args.fp16_image_mpp,
                                          args.fp16_check_device, RUNS / "models"), "fp16"))
        for variant, label in variants:
            if isinstance(variant, str):  # the variant failed its check: a failed row says why
                runs.append(asdict(ModelRun(model=f"{path.stem} fp16", returncode=1, wall_s=0.0,
                                            error=variant)))
                continue
            print(f"running {variant.name} on {slide_path.name}…", file=sys.stderr)
            runs.append(asdict(_run_model(slide_path, variant.resolve(), RUNS / variant.stem, extra,
                                          device=args.device, label=label)))
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpus": gpus,
        "device": args.device,
        "providers": providers,
        "python": platform.python_version(),
        "slide": {"name": slide_path.name, "height": height, "width": width, "mpp": mpp},
        "sample_seconds": SAMPLE_SECONDS,
        "runs": runs,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for gpu.json and gpu.md")
    parser.add_argument("--wheels", type=Path, help="folder of wheels to install (onnxruntime-gpu…)")
    parser.add_argument("--no-venv", action="store_true",
                        help="install the wheels into the running environment")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"default {DEFAULT_VENV}")
    parser.add_argument("--installed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slide", type=Path, default=WORK / "big_slide_40x.tiff")
    parser.add_argument("--size", type=int, default=20_000, help="side of a slide built here")
    parser.add_argument("--model", type=Path, help="default: the bundled default model")
    parser.add_argument("--hovernet", type=Path,
                        help="official HoVer-Net fast checkpoint (or its imported .onnx)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a dry run of the script (still needs nvidia-smi)")
    parser.add_argument("--hovernet-types", default="pannuke", help="--types for model import")
    parser.add_argument("--trt-cache", type=Path, default=TRT_CACHE,
                        help=f"TensorRT engine folder, kept between runs (default {TRT_CACHE})")
    parser.add_argument("--fp16", action="store_true",
                        help="also run each model's float16 variant (made by hoverserve model fp16)")
    parser.add_argument("--fp16-image", type=Path, default=FP16_IMAGE,
                        help="real H&E image the fp16 variants are checked on")
    parser.add_argument("--fp16-image-mpp", type=float, default=FP16_IMAGE_MPP,
                        help=f"its µm per pixel (default {FP16_IMAGE_MPP})")
    parser.add_argument("--fp16-check-device", choices=("cpu", "cuda"), default="cpu",
                        help="where the fp16 check runs (cuda: the GPU's own float16 kernels, "
                             "and TensorRT builds engines for the check first)")
    parser.epilog = "Options after -- go to hoverserve infer (e.g. -- --batch-size 64)."
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = _parser().parse_args(own)
    args.extra = extra
    gpus = detect_gpu()
    if not gpus:
        print("bench/gpu.py: no CUDA GPU on this machine (nvidia-smi missing or lists none); "
              "run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return _EXIT_NO_GPU
    try:
        if args.wheels is not None and not args.installed:
            if not args.wheels.is_dir():
                raise SetupError(f"--wheels {args.wheels}: no such folder")
            if not args.no_venv:
                return _reexec_in_venv(args.venv, args.wheels, [*own, "--no-venv", "--installed",
                                                                 "--", *extra])
            _pip(sys.executable, args.wheels)
        result = _benchmark(args, gpus)
    except SetupError as exc:
        print(f"bench/gpu.py: {exc}", file=sys.stderr)
        return exc.code
    except ImportError as exc:  # a dependency the image lacks and the wheels did not bring
        print(f"bench/gpu.py: missing package ({exc}); add its wheel to --wheels DIR",
              file=sys.stderr)
        return _EXIT_SETUP
    json_path, md_path = write_report(result, args.out)
    print(markdown_table(result))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    failed = [r for r in result["runs"] if r["returncode"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
