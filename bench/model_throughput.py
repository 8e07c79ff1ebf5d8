"""Size and CPU speed of a ConicNet architecture: parameters, GFLOPs per patch, patches/s in ORT.

Usage::

    python bench/model_throughput.py [--arch conic] [--input 256] [--output 224] [--threads 2]
                                     [--batch 4] [--repeats 5] [--onnx FILE]

GFLOPs are counted by PyTorch's FlopCounterMode (2 FLOPs per multiply-accumulate, convolutions
and matrix products only). Speed is measured in ONNX Runtime on the CPU, as the pipeline runs it,
with a random-weight export of the architecture unless ``--onnx`` names an existing file.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.card import ClassInfo, ModelCard
from models.conic import BUILDERS
from models.export import export_onnx


def _gflops(model: torch.nn.Module, size: int) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.rand(1, 3, size, size) * 255)
    return counter.get_total_flops() / 1e9


def _patches_per_second(path: Path, size: int, *, threads: int, batch: int, repeats: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    image = (np.random.default_rng(0).random((batch, 3, size, size)) * 255).astype(np.float32)
    session.run(None, {"image": image})  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, {"image": image})
        times.append(time.perf_counter() - started)
    return batch / float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="conic", choices=sorted(BUILDERS))
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--input", type=int, default=256)
    parser.add_argument("--output", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--onnx", type=Path, default=None, help="time this file instead of a random export")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = BUILDERS[args.arch](args.classes).eval()
    params = sum(p.numel() for p in model.parameters())
    gflops = _gflops(model, args.input)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.onnx
        if path is None:
            classes = tuple(ClassInfo(name=f"c{i}", colour=(0, 0, 0)) for i in range(args.classes))
            card = ModelCard(
                name=args.arch, input_size=args.input, output_size=args.output, mpp=0.5, classes=classes
            )
            model.margin = card.margin
            path = export_onnx(model, card, Path(tmp) / "model.onnx")
        speed = _patches_per_second(
            path, args.input, threads=args.threads, batch=args.batch, repeats=args.repeats
        )
    result = {
        "arch": args.arch,
        "params_million": round(params / 1e6, 3),
        "input": args.input,
        "output": args.output,
        "gflops_per_patch": round(gflops, 3),
        "ort_threads": args.threads,
        "patches_per_s": round(speed, 2),
        "output_megapixels_per_s": round(speed * args.output**2 / 1e6, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
