"""Synthetic slides with known nuclei, and an ONNX "oracle" model that reads their exact maps.

The slide's colour channels encode the HoVer-Net maps of known ellipses: red is one minus the
nucleus probability (255 outside, so white background reads as "no nucleus"; a per-class level
inside), green and blue are the horizontal and vertical distance maps mapped from −1..1 to 0..255.
The oracle model decodes them, so the pipeline's maps are exact and every difference from the known
nuclei comes from tiling, seams or merging.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper

from models.card import ClassInfo, ModelCard, card_metadata

CLASS_LEVELS = (255.0, 55.0, 5.0)
"""Red value of background and of classes 1 and 2."""

CLASSES = (
    ClassInfo(name="Background", colour=(0, 0, 0)),
    ClassInfo(name="Alpha", colour=(255, 0, 0)),
    ClassInfo(name="Beta", colour=(0, 160, 255)),
)


def draw_ellipses(
    shape: tuple[int, int], n: int, *, seed: int = 0, radius: tuple[float, float] = (5.0, 11.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Instance map (H, W) int32 of up to ``n`` ellipses (touching allowed, overlap not) and
    per-instance classes (index = id, 0 unused)."""
    rng = np.random.default_rng(seed)
    inst = np.zeros(shape, np.int32)
    classes = [0]
    span = int(np.ceil(radius[1])) + 2
    for _ in range(n * 4):
        if len(classes) > n:
            break
        cy, cx = round(rng.uniform(12, shape[0] - 12)), round(rng.uniform(12, shape[1] - 12))
        ay, ax = rng.uniform(*radius), rng.uniform(*radius)
        angle = float(rng.uniform(0, 180))
        # Draw in a small window around the centre: the full image per ellipse is too slow.
        r0, c0 = max(cy - span, 0), max(cx - span, 0)
        window = np.zeros((min(cy + span, shape[0]) - r0, min(cx + span, shape[1]) - c0), np.uint8)
        cv2.ellipse(window, (cx - c0, cy - r0), (round(ax), round(ay)), angle, 0, 360, 1, -1)
        ys, xs = np.nonzero(window)
        ys, xs = ys + r0, xs + c0
        if len(ys) < 30 or inst[ys, xs].any():
            continue
        label = len(classes)
        inst[ys, xs] = label
        classes.append(int(rng.integers(1, 3)))
    return inst, np.array(classes, np.int32)


def hv_maps(inst: np.ndarray) -> np.ndarray:
    """(2, H, W) float32 horizontal/vertical distances to each instance's centre, in −1..1."""
    from scipy import ndimage

    hv = np.zeros((2, *inst.shape), np.float32)
    for index, window in enumerate(ndimage.find_objects(inst)):
        if window is None:
            continue
        ys, xs = np.nonzero(inst[window] == index + 1)
        ys, xs = ys + window[0].start, xs + window[1].start
        for axis, coord in ((0, xs), (1, ys)):
            d = coord - coord.mean()
            neg, pos = -d[d < 0].min(initial=0), d[d > 0].max(initial=0)
            d = np.where(d < 0, d / max(neg, 1e-6), d / max(pos, 1e-6))
            hv[axis, ys, xs] = d
    return hv


def encode_slide(inst: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """RGB uint8 image whose channels are the maps of ``inst``."""
    hv = hv_maps(inst)
    rgb = np.empty((*inst.shape, 3), np.uint8)
    rgb[..., 0] = np.asarray(CLASS_LEVELS, np.float32)[classes[inst]].astype(np.uint8)
    rgb[..., 1:] = np.clip(np.round((hv.transpose(1, 2, 0) + 1) * 127.5), 0, 255).astype(np.uint8)
    return rgb


def oracle_card(*, input_size: int = 272, output_size: int = 256, mpp: float = 0.25) -> ModelCard:
    return ModelCard(
        name="oracle", family="hover", architecture="oracle", input_size=input_size,
        output_size=output_size, mpp=mpp, classes=CLASSES, licence="test fixture",
    )


def _ints(name: str, values: list[int]) -> onnx.NodeProto:
    tensor = helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
    return helper.make_node("Constant", [], [name], value=tensor)


def _scalar(name: str, value: float) -> onnx.NodeProto:
    tensor = helper.make_tensor(name, TensorProto.FLOAT, [], [value])
    return helper.make_node("Constant", [], [name], value=tensor)


def _class_softmax(red: str, output: str) -> list[onnx.NodeProto]:
    """Nodes turning the red channel ``red`` into a softmax ``output`` over :data:`CLASS_LEVELS`
    (a Gaussian score around each level; needs the constant ``k15``)."""
    nodes, scores = [], []
    for k, level in enumerate(CLASS_LEVELS):
        nodes += [
            _scalar(f"lvl{k}", level),
            helper.make_node("Sub", [red, f"lvl{k}"], [f"d{k}"]),
            helper.make_node("Div", [f"d{k}", "k15"], [f"z{k}"]),
            helper.make_node("Mul", [f"z{k}", f"z{k}"], [f"zz{k}"]),
            helper.make_node("Neg", [f"zz{k}"], [f"s{k}"]),
        ]
        scores.append(f"s{k}")
    return [*nodes, helper.make_node("Concat", scores, ["logits"], axis=1),
            helper.make_node("Softmax", ["logits"], [output], axis=1)]


def _save_model(path: Path, nodes: list[onnx.NodeProto], card: ModelCard,
                outputs: list[tuple[str, int]]) -> Path:
    """Check and write a graph from ``image`` (N×3×input) to ``outputs`` (name, channels; each
    N×C×output), ``card`` embedded."""
    size, out = card.input_size, card.output_size
    graph = helper.make_graph(
        nodes, card.name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", channels, out, out])
         for name, channels in outputs],
    )
    return write_graph(path, graph, card)


def write_graph(path: Path, graph: onnx.GraphProto, card: ModelCard) -> Path:
    """Check and write ``graph`` (opset 17) as a model file with ``card`` embedded."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in card_metadata(card).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_oracle(path: Path, card: ModelCard | None = None) -> Path:
    """Write the decoding ONNX model (centre crop by the card's margin) to ``path``."""
    card = card or oracle_card()
    m, size = card.margin, card.input_size
    nodes = [
        _ints("starts", [m, m]), _ints("ends", [size - m, size - m]), _ints("axes", [2, 3]),
        helper.make_node("Slice", ["image", "starts", "ends", "axes"], ["crop"]),
        _ints("c0", [0]), _ints("c1", [1]), _ints("c3", [3]), _ints("ch_axis", [1]),
        helper.make_node("Slice", ["crop", "c0", "c1", "ch_axis"], ["red"]),
        helper.make_node("Slice", ["crop", "c1", "c3", "ch_axis"], ["greenblue"]),
        _scalar("k255", 255.0), _scalar("k127", 127.5), _scalar("one", 1.0), _scalar("k15", 15.0),
        helper.make_node("Div", ["red", "k255"], ["red01"]),
        helper.make_node("Sub", ["one", "red01"], ["np_prob"]),
        helper.make_node("Div", ["greenblue", "k127"], ["gb"]),
        helper.make_node("Sub", ["gb", "one"], ["hv"]),
        *_class_softmax("red", "tp_prob"),
    ]
    return _save_model(path, nodes, card, [("np_prob", 1), ("hv", 2), ("tp_prob", 3)])


def write_tiff(path: Path, rgb: np.ndarray, *, mpp: float, tile: int = 256, levels: int = 1) -> Path:
    """A tiled (pyramidal when ``levels`` > 1) lossless RGB TIFF with its resolution."""
    import tifffile

    res = 1e4 / mpp  # pixels per cm
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        image = rgb
        for level in range(levels):
            tif.write(
                image, tile=(tile, tile), photometric="rgb", compression="zlib",
                resolution=(res / 2**level, res / 2**level), resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
            )
            image = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2),
                               interpolation=cv2.INTER_AREA)
    return path


def boundary_card(*, input_size: int = 144, output_size: int = 128, mpp: float = 0.25) -> ModelCard:
    """The card of :func:`build_boundary_oracle`: family ``boundary``, the oracle's classes."""
    return ModelCard(
        name="boundary-oracle", family="boundary", architecture="oracle", input_size=input_size,
        output_size=output_size, mpp=mpp, classes=CLASSES, licence="test fixture",
    )


def encode_boundary_slide(inst: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """RGB uint8 image for the boundary oracle: red the class level as in :func:`encode_slide`,
    green 255 on each nucleus' one-pixel inner boundary (what TSFD-Net's boundary head learns),
    blue 0."""
    from scipy import ndimage

    rgb = np.zeros((*inst.shape, 3), np.uint8)
    rgb[..., 0] = np.asarray(CLASS_LEVELS, np.float32)[classes[inst]].astype(np.uint8)
    # A pixel is on the boundary when a 4-neighbour belongs to another label (or background).
    eroded = ndimage.grey_erosion(inst, footprint=ndimage.generate_binary_structure(2, 1),
                                  mode="constant", cval=0)
    dilated = ndimage.grey_dilation(inst, footprint=ndimage.generate_binary_structure(2, 1),
                                    mode="constant", cval=0)
    rgb[..., 1] = np.where((inst > 0) & ((eroded != inst) | (dilated != inst)), 255, 0)
    return rgb


def build_boundary_oracle(path: Path, card: ModelCard | None = None) -> Path:
    """Write an ONNX model of the ``boundary`` contract that decodes
    :func:`encode_boundary_slide`'s image: ``sem_prob`` (softmax over the class levels of red)
    and ``boundary_prob`` (green / 255), centre-cropped by the card's margin."""
    card = card or boundary_card()
    m, size = card.margin, card.input_size
    nodes = [
        _ints("starts", [m, m]), _ints("ends", [size - m, size - m]), _ints("axes", [2, 3]),
        helper.make_node("Slice", ["image", "starts", "ends", "axes"], ["crop"]),
        _ints("c0", [0]), _ints("c1", [1]), _ints("c2", [2]), _ints("ch_axis", [1]),
        helper.make_node("Slice", ["crop", "c0", "c1", "ch_axis"], ["red"]),
        helper.make_node("Slice", ["crop", "c1", "c2", "ch_axis"], ["green"]),
        _scalar("k255", 255.0), _scalar("k15", 15.0),
        helper.make_node("Div", ["green", "k255"], ["boundary_prob"]),
        *_class_softmax("red", "sem_prob"),
    ]
    return _save_model(path, nodes, card, [("sem_prob", 3), ("boundary_prob", 1)])
