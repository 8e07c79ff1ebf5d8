"""Recover trainable weights from an exported ONNX model, so a shipped model can be fine-tuned.

Users get the ONNX file, not our training checkpoints. The exporter folds every BatchNorm into
the convolution before it and names only the weights that are not convolutions (squeeze-and-
excitation and attention layers keep their state-dict names). So the network is rebuilt from its
config, its convolutions are matched to the ONNX ``Conv`` nodes in execution order (shapes must
agree one by one), each folded BatchNorm becomes an identity with the folded bias, and the result
is checked against ONNX Runtime on a random patch before it is used.

An identity BatchNorm would normalise by batch statistics as soon as training starts, which is a
different function; :func:`calibrate_batchnorm` re-expresses each one in terms of the statistics
of its input on real batches, so the network computes the same thing in eval mode and nearly the
same thing in train mode.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from models.export import OnnxHead

__all__ = ["calibrate_batchnorm", "load_instance_onnx_weights", "load_onnx_weights"]

logger = logging.getLogger(__name__)

_TOLERANCE = 1e-3
"""Largest |difference| between the rebuilt network and ONNX Runtime, on probabilities and HV."""


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if (
            node.op_type == "Constant"
            and node.attribute
            and node.attribute[0].type == onnx.AttributeProto.TENSOR
        ):
            arrays[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in arrays:
            # the exporter keeps one copy of equal tensors (e.g. the zero biases of untrained
            # BatchNorms) and hands it on through Identity nodes
            arrays[node.output[0]] = arrays[node.input[0]]
    return arrays


def _execution_order(
    model: nn.Module, input_size: int
) -> tuple[list[nn.Conv2d], dict[nn.Conv2d, nn.BatchNorm2d]]:
    """Convolutions in the order they run, and the BatchNorm applied directly to each output."""
    order: list[nn.Conv2d] = []
    follows: dict[nn.Conv2d, nn.BatchNorm2d] = {}
    last: dict[str, object] = {}

    def on_conv(module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
        order.append(module)  # type: ignore[arg-type]
        last["module"], last["output"] = module, output

    def on_norm(module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
        if inputs[0] is last.get("output") and isinstance(module, nn.BatchNorm2d):
            follows[last["module"]] = module  # type: ignore[index]

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(on_conv))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_hook(on_norm))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for hook in hooks:
            hook.remove()
    return order, follows


@torch.no_grad()
def load_onnx_weights(
    model: nn.Module, path: str | Path, *, input_size: int, typed: bool, tta: str = "none"
) -> None:
    """Load the weights of an ONNX file exported by :func:`models.export.export_onnx` into ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        A freshly built network of the same architecture and widths as the exported one.
    path : str or Path
        The ONNX file.
    input_size : int
        Side of the model's input patch (the card's ``input_size``).
    typed : bool
        Whether the model has a type head.
    tta : str
        The card's ``test_time_augmentation`` (the graph runs the network once per transform).

    Raises
    ------
    ValueError
        The file's convolutions or named weights do not fit ``model``, or the rebuilt network
        does not reproduce the file's outputs.
    """
    was_training = model.training
    model.eval()
    graph = onnx.load(str(path)).graph
    arrays = _constants(graph)
    convs = [node for node in graph.node if node.op_type == "Conv"]
    order, follows = _execution_order(model, input_size)
    if len(order) != len(convs):
        raise ValueError(f"{path}: {len(convs)} convolutions in the file, {len(order)} in the network")

    _load_convolutions(path, order, convs, follows, arrays, what="convolution")
    named = _load_named(model, arrays)
    logger.info("loaded %d convolutions and %d named tensors from %s", len(order), named, path)
    _check_against_runtime(model, path, input_size=input_size, typed=typed, tta=tta)
    model.train(was_training)


def _load_convolutions(
    path: str | Path,
    order: list[nn.Conv2d],
    nodes: list[onnx.NodeProto],
    follows: dict[nn.Conv2d, nn.BatchNorm2d],
    arrays: dict[str, np.ndarray],
    *,
    what: str,
) -> None:
    """Set each network convolution (in execution order) from the graph's ``Conv`` node at the
    same place, shapes checked one by one (``what`` names them in the error)."""
    for index, (module, node) in enumerate(zip(order, nodes, strict=True)):
        weight = arrays[node.input[1]]
        bias = arrays[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        if tuple(weight.shape) != tuple(module.weight.shape):
            raise ValueError(
                f"{path}: {what} {index} has weights {weight.shape}, "
                f"the network {tuple(module.weight.shape)}"
            )
        _unfold(module, follows.get(module), weight, bias)


def _load_named(model: nn.Module, arrays: dict[str, np.ndarray]) -> int:
    """Copy every state-dict tensor the graph keeps by name (``model.<name>``, same shape)."""
    named = 0
    for name, tensor in model.state_dict().items():
        array = arrays.get(f"model.{name}")
        if array is None:
            continue
        if tuple(array.shape) != tuple(tensor.shape):
            raise ValueError(f"weight {name} is {tuple(array.shape)} in the file, "
                             f"{tuple(tensor.shape)} in the network")
        tensor.copy_(torch.from_numpy(array.copy()))
        named += 1
    return named


def _unfold(
    module: nn.Conv2d, norm: nn.BatchNorm2d | None, weight: np.ndarray, bias: np.ndarray | None
) -> None:
    """Set a convolution from its folded graph weights; the BatchNorm after it becomes an identity
    that adds the folded bias."""
    module.weight.copy_(torch.from_numpy(weight.copy()))
    folded = torch.from_numpy(bias.copy()) if bias is not None else torch.zeros(weight.shape[0])
    if norm is not None:
        running_mean, running_var = _running_stats(norm)
        norm.weight.fill_(1.0)
        norm.bias.copy_(folded)
        running_mean.zero_()
        running_var.fill_(1.0 - norm.eps)  # so that sqrt(var + eps) == 1
        if module.bias is not None:
            module.bias.zero_()
    elif module.bias is not None:
        module.bias.copy_(folded)


_BOX_TOLERANCE = 1e-2
"""Largest |difference| in box corners (input pixels) between a rebuilt detector and the file."""


@torch.no_grad()
def load_instance_onnx_weights(model: nn.Module, path: str | Path, *, input_size: int = 256) -> None:
    """Load an instance-family ONNX file (:func:`models.panoptic.export.export_instance_onnx`)
    into a freshly built :class:`~models.panoptic.net.PanopticNet` of the same architecture.

    The graph keeps the state-dict names of everything outside the ResNet trunk (FPN, RPN, box
    and mask heads); the trunk's convolutions, each with its BatchNorm folded in, are the
    graph's anonymous ``Conv`` nodes, matched in order. The semantic branch trains the features
    but is not in the graph (inference does not use it): it keeps its initialisation.

    Raises
    ------
    ValueError
        The file does not fit ``model``, or the rebuilt detector's boxes, scores or masks on a
        seeded image differ from ONNX Runtime's.
    """
    was_training = model.training
    model.eval()
    graph = onnx.load(str(path)).graph
    arrays = _constants(graph)
    trunk = getattr(getattr(model, "backbone", None), "body", None)
    if not isinstance(trunk, nn.Module):
        raise ValueError(f"{path}: the network has no backbone trunk (model.backbone.body)")
    anonymous = [n for n in graph.node if n.op_type == "Conv" and not n.input[1].startswith("model.")]
    order, follows = _execution_order(trunk, input_size)
    if len(order) != len(anonymous):
        raise ValueError(f"{path}: {len(anonymous)} folded convolutions in the file, "
                         f"{len(order)} in the network's trunk")
    _load_convolutions(path, order, anonymous, follows, arrays, what="trunk convolution")
    named = _load_named(model, arrays)
    logger.info("loaded %d trunk convolutions and %d named tensors from %s", len(order), named, path)
    _check_detector_against_runtime(model, path)
    model.train(was_training)


def _check_detector_against_runtime(model: nn.Module, path: str | Path) -> None:
    from models.panoptic.export import InstanceHead, reference_image

    sample = reference_image()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: sample.numpy()})
    got = [t.numpy() for t in InstanceHead(model)(sample)]
    if got[0].shape != expected[0].shape:
        raise ValueError(f"{path}: the rebuilt detector finds {len(got[0])} nuclei on a seeded "
                         f"image, the file {len(expected[0])}")
    # detections with scores equal to ~1e-6 may come out in either order: pair each of the file's
    # boxes with the rebuilt detector's nearest one
    gaps = np.abs(expected[0][:, None, :] - got[0][None, :, :]).max(axis=2)
    pair = gaps.argmin(axis=1) if len(gaps) else np.zeros(0, dtype=np.int64)
    for name, want, have, tolerance in zip(("boxes", "scores", "classes", "masks"), expected, got,
                                           (_BOX_TOLERANCE, _TOLERANCE, 0, _TOLERANCE), strict=True):
        diff = float(np.abs(have[pair] - want).max(initial=0.0))
        if not diff <= tolerance:
            raise ValueError(f"{path}: the rebuilt detector's {name} differ from the file's by {diff:.3g}")


def _check_against_runtime(
    model: nn.Module, path: str | Path, *, input_size: int, typed: bool, tta: str
) -> None:
    sample = (np.random.default_rng(0).random((1, 3, input_size, input_size)) * 255).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: sample})
    with torch.no_grad():
        got = OnnxHead(model, typed=typed, tta=tta)(torch.from_numpy(sample))
    for want, have in zip(expected, got, strict=True):
        have_np = have.numpy()
        margin = (have_np.shape[-1] - want.shape[-1]) // 2
        if margin:
            have_np = have_np[..., margin : margin + want.shape[-2], margin : margin + want.shape[-1]]
        diff = float(np.abs(have_np - want).max())
        if not diff <= _TOLERANCE:
            raise ValueError(f"{path}: the rebuilt network differs from the file by {diff:.3g}")


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Re-express every BatchNorm by the statistics of its input, keeping the eval-mode function.

    For input statistics (mean m, variance v) a BatchNorm ``x * w / s + b'`` with s = sqrt(v + eps)
    computes the same as before when w = s * w_old / s_old and b' = b_old + (m - mean_old) * w_old / s_old;
    in train mode its batch statistics are then close to (m, v), so training starts where the
    eval-mode network is.

    Returns
    -------
    int
        Number of BatchNorm layers calibrated.
    """
    was_training = model.training
    model.eval()
    moments: dict[nn.Module, _Moments] = {}

    def on_norm(module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
        moments.setdefault(module, _Moments()).add(inputs[0].detach().double())

    hooks = [m.register_forward_hook(on_norm) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        for batch in batches:
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    for norm, stats in moments.items():
        if not isinstance(norm, nn.BatchNorm2d):
            continue
        mean, var = stats.mean_var()
        running_mean, running_var = _running_stats(norm)
        old_scale = norm.weight.double() / torch.sqrt(running_var.double() + norm.eps)
        new_std = torch.sqrt(var + norm.eps)
        norm.bias.copy_(norm.bias.double() + (mean - running_mean.double()) * old_scale)
        norm.weight.copy_(new_std * old_scale)
        running_mean.copy_(mean)
        running_var.copy_(var)
    model.train(was_training)
    return len(moments)


class _Moments:
    """Running per-channel sums of one BatchNorm's input (N, C, H, W), in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.total: Tensor | None = None
        self.squares: Tensor | None = None

    def add(self, x: Tensor) -> None:
        total, squares = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        self.count += x.numel() // x.shape[1]
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares

    def mean_var(self) -> tuple[Tensor, Tensor]:
        if self.total is None or self.squares is None:
            raise ValueError("no input seen")
        mean = self.total / self.count
        return mean, (self.squares / self.count - mean * mean).clamp_min(0.0)


def _running_stats(norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError(f"{norm} keeps no running statistics")
    return norm.running_mean, norm.running_var
