"""A synthetic slide of disks and an ONNX "oracle" of the ``instance`` (Mask R-CNN) contract.

Each nucleus is a disk centred on a pixel. The slide encodes it so that a graph without any
learning can detect it: red is the class level inside the disk (:data:`tests._synthetic.
CLASS_LEVELS`, 255 outside), green is 255 on the centre pixel only and blue there holds ten times
the radius. The oracle finds every green pixel on a nucleus (red below 128: white padding is
green too) and outputs one detection per centre: the box of the disk, a score (0.5 at the
input's top to 0.9 at its bottom), the class read from red and a disk-shaped 28×28 mask, just
as a trained detector would. Every difference between the disks found and the disks drawn then
comes from the family's plumbing: one patch per region, pasting, seams and merging.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.card import ModelCard
from tests._synthetic import CLASS_LEVELS, CLASSES, write_graph

MASK = 28
"""Side of the oracle's box-relative masks."""


def instance_card(*, input_size: int = 96, output_size: int = 32, mpp: float = 0.25) -> ModelCard:
    return ModelCard(
        name="instance-oracle", family="instance", architecture="oracle", input_size=input_size,
        output_size=output_size, mpp=mpp, classes=CLASSES, licence="test fixture",
    )


def draw_disks(shape: tuple[int, int], count: int, *, seed: int,
               radii: tuple[int, int] = (4, 8)) -> tuple[np.ndarray, np.ndarray]:
    """``count`` (or fewer) disks that do not touch: (n, 3) int rows (row, col, radius) and their
    classes (n,) in 1..2, in raster order of their centres."""
    rng = np.random.default_rng(seed)
    placed: list[tuple[int, int, int]] = []
    for _ in range(count * 20):
        if len(placed) == count:
            break
        r = int(rng.integers(radii[0], radii[1] + 1))
        row = int(rng.integers(r + 1, shape[0] - r - 1))
        col = int(rng.integers(r + 1, shape[1] - r - 1))
        if all((row - a) ** 2 + (col - b) ** 2 > (r + c + 3) ** 2 for a, b, c in placed):
            placed.append((row, col, r))
    disks = np.array(sorted(placed), np.int64)
    return disks, rng.integers(1, 3, size=len(disks))


def encode_disk_slide(shape: tuple[int, int], disks: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """RGB uint8 image of the disks for :func:`build_instance_oracle`."""
    rgb = np.zeros((*shape, 3), np.uint8)
    rgb[..., 0] = 255
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    for (row, col, r), k in zip(disks.tolist(), classes.tolist(), strict=True):
        inside = (rows - row) ** 2 + (cols - col) ** 2 <= r * r
        rgb[..., 0][inside] = int(CLASS_LEVELS[k])
        rgb[row, col, 1] = 255
        rgb[row, col, 2] = 10 * r
    return rgb


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def _disk_mask() -> np.ndarray:
    centre = (np.arange(MASK) + 0.5 - MASK / 2) ** 2
    return ((centre[:, None] + centre[None, :]) <= (MASK / 2) ** 2).astype(np.float32)[None, None]


def build_instance_oracle(path: Path, card: ModelCard | None = None) -> Path:
    """Write the detecting ONNX model (one image per run, any size) to ``path``."""
    card = card or instance_card()
    f32, i64 = np.float32, np.int64
    nodes = [
        _const("zero", np.array([0], i64)), _const("one", np.array([1], i64)),
        _const("two", np.array([2], i64)), _const("three", np.array([3], i64)),
        _const("ch_axis", np.array([1], i64)), _const("lead", np.array([0, 1], i64)),
        *(helper.make_node("Slice", ["image", a, b, "ch_axis"], [f"{name}4"])
          for name, a, b in (("red", "zero", "one"), ("green", "one", "two"), ("blue", "two", "three"))),
        *(helper.make_node("Squeeze", [f"{name}4", "lead"], [name]) for name in ("red", "green", "blue")),
        _const("half255", np.array(127.5, f32)),
        # White (the padding beyond a slide's edge) is green too: a centre is green on a nucleus.
        helper.make_node("Greater", ["green", "half255"], ["green_on"]),
        helper.make_node("Less", ["red", "half255"], ["on_nucleus"]),
        helper.make_node("And", ["green_on", "on_nucleus"], ["centre"]),
        helper.make_node("NonZero", ["centre"], ["where"]),  # (2, K): rows, then cols
        helper.make_node("Transpose", ["where"], ["index"], perm=[1, 0]),
        helper.make_node("GatherND", ["blue", "index"], ["blue_k"]),
        helper.make_node("GatherND", ["red", "index"], ["red_k"]),
        helper.make_node("Gather", ["index", "zero"], ["row_k1"], axis=1),
        helper.make_node("Gather", ["index", "one"], ["col_k1"], axis=1),
        helper.make_node("Cast", ["row_k1"], ["row_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["col_k1"], ["col_f"], to=TensorProto.FLOAT),
        _const("tenth", np.array(0.1, f32)), _const("halfpx", np.array(0.5, f32)),
        helper.make_node("Mul", ["blue_k", "tenth"], ["radius"]),
        helper.make_node("Unsqueeze", ["radius", "one"], ["radius1"]),
        # The disk's pixels are the centre's +- r: the box spans their edges, centred on the
        # centre pixel's centre.
        helper.make_node("Add", ["radius1", "halfpx"], ["reach"]),
        helper.make_node("Add", ["col_f", "halfpx"], ["cx"]),
        helper.make_node("Add", ["row_f", "halfpx"], ["cy"]),
        helper.make_node("Sub", ["cx", "reach"], ["x0"]), helper.make_node("Sub", ["cy", "reach"], ["y0"]),
        helper.make_node("Add", ["cx", "reach"], ["x1"]), helper.make_node("Add", ["cy", "reach"], ["y1"]),
        helper.make_node("Concat", ["x0", "y0", "x1", "y1"], ["boxes"], axis=1),
        # Scores rise from 0.5 to 0.9 down the input, so that overlapping detections have an
        # order (a mirrored copy below an edge beats the original).
        helper.make_node("Shape", ["green"], ["hw"]),
        helper.make_node("Gather", ["hw", "zero"], ["height_i"]),
        helper.make_node("Cast", ["height_i"], ["height_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["row_f", "height_f"], ["depth"]),
        _const("rise", np.array(0.4, f32)), _const("base", np.array(0.5, f32)),
        helper.make_node("Mul", ["depth", "rise"], ["lift"]),
        helper.make_node("Add", ["lift", "base"], ["scores1"]),
        helper.make_node("Squeeze", ["scores1", "one"], ["scores"]),
        _const("dark", np.array(30.0, f32)),
        helper.make_node("Less", ["red_k", "dark"], ["second"]),
        helper.make_node("Cast", ["second"], ["second_i"], to=TensorProto.INT64),
        _const("first", np.array(1, i64)),
        helper.make_node("Add", ["second_i", "first"], ["classes"]),
        helper.make_node("Shape", ["radius"], ["k"]),
        _const("mask_tail", np.array([1, MASK, MASK], i64)),
        helper.make_node("Concat", ["k", "mask_tail"], ["mask_shape"], axis=0),
        _const("disk", _disk_mask()),
        helper.make_node("Expand", ["disk", "mask_shape"], ["masks"]),
    ]
    graph = helper.make_graph(
        nodes, card.name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["K", 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["K"]),
         helper.make_tensor_value_info("classes", TensorProto.INT64, ["K"]),
         helper.make_tensor_value_info("masks", TensorProto.FLOAT, ["K", 1, MASK, MASK])],
    )
    return write_graph(path, graph, card)
