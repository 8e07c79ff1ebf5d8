"""Point-supervised fine-tuning: disk labels, the masked and anchor losses, what trains, a tiny run."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.card import ClassInfo, ModelCard, read_card
from models.conic.builder import build_conic_tiny
from models.export import export_onnx
from models.train.augment import AugmentOptions
from models.train.point_finetune import (
    IGNORE,
    PointFinetuneOptions,
    PointPatches,
    anchor_loss,
    finetune_points,
    point_label_map,
    point_loss,
    set_trainable,
)

CLASSES = ("background", "other", "inflammatory", "epithelial", "spindle")


def test_each_point_labels_a_disk_of_its_class_and_the_rest_is_ignored() -> None:
    labels = point_label_map((40, 60), np.array([[10.0, 20.0], [45.0, 8.0]]), np.array([2, 4]), radius_px=3)
    assert labels[20, 10] == 2 and labels[20, 13] == 2 and labels[23, 10] == 2
    assert labels[8, 45] == 4
    assert labels[20, 15] == IGNORE and labels[0, 0] == IGNORE
    assert set(np.unique(labels)) == {2, 4, IGNORE}
    assert 20 < (labels == 2).sum() < 40  # a radius-3 disk, not a square or a single pixel


def test_a_point_inside_a_predicted_nucleus_labels_the_whole_nucleus() -> None:
    inst = np.zeros((30, 30), np.int32)
    inst[2:12, 2:12] = 1  # one point of class 3
    inst[15:28, 15:28] = 2  # two points that disagree: only their disks
    xy = np.array([[6.0, 6.0], [18.0, 18.0], [25.0, 25.0], [28.0, 2.0]])
    labels = point_label_map((30, 30), xy, np.array([3, 2, 4, 1]), radius_px=1, inst=inst)
    assert (labels[inst == 1] == 3).all()
    assert labels[21, 21] == IGNORE and labels[18, 18] == 2 and labels[25, 25] == 4
    assert labels[2, 28] == 1 and labels[0, 28] == IGNORE  # in the background: its disk only
    with pytest.raises(ValueError, match="inst shape"):
        point_label_map((20, 30), xy, np.array([3, 2, 4, 1]), radius_px=1, inst=inst)


def test_point_label_map_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="radius"):
        point_label_map((8, 8), np.zeros((1, 2)), np.array([1]), radius_px=0)
    with pytest.raises(ValueError, match="classes"):
        point_label_map((8, 8), np.zeros((2, 2)), np.array([1]), radius_px=2)
    with pytest.raises(ValueError, match=r"0\.\.254"):
        point_label_map((8, 8), np.zeros((1, 2)), np.array([IGNORE]), radius_px=2)


def test_point_loss_counts_labelled_pixels_only() -> None:
    logits = torch.zeros(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), IGNORE, dtype=torch.int64)
    empty = point_loss(logits, target)
    assert float(empty.detach()) == 0.0
    empty.backward()  # still connected to the graph
    target[0, 1, 1] = 2
    with torch.no_grad():
        confident = logits.detach().clone()
        confident[0, 2, 1, 1] = 10.0  # right where labelled; every ignored pixel stays uniform
    assert float(point_loss(confident, target)) < 1e-3
    assert float(point_loss(logits.detach(), target)) == pytest.approx(np.log(3), rel=1e-5)


def test_anchor_loss_is_zero_when_nothing_moved_and_grows_with_change() -> None:
    gen = torch.Generator().manual_seed(0)
    ref = {"np": torch.randn(2, 2, 8, 8, generator=gen), "hv": torch.randn(2, 2, 8, 8, generator=gen)}
    assert float(anchor_loss(ref, ref)) == pytest.approx(0.0, abs=1e-6)
    moved = {"np": ref["np"] + torch.tensor([1.0, -1.0]).view(1, 2, 1, 1), "hv": ref["hv"] + 0.5}
    assert float(anchor_loss(moved, ref)) > 0.25


def test_set_trainable_freezes_all_but_the_named_part() -> None:
    model = build_conic_tiny(5)
    heads = {n for n, p in model.named_parameters() if p in set(set_trainable(model, "head"))}
    assert heads and all(n.startswith("tp_head.") for n in heads)
    set_trainable(model, "decoder")
    decoder = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("decoder.") for n in decoder)
    assert any(n.startswith("tp_head.") for n in decoder)
    assert not any(n.startswith(("np_head", "hv_head", "stages", "stem")) for n in decoder)
    assert len(set_trainable(model, "all")) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="unknown trainable"):
        set_trainable(model, "encoder")


def _point_set(folder: Path, rng: np.random.Generator) -> Path:
    (folder / "images").mkdir(parents=True)
    arrays: dict[str, object] = {}
    names = []
    for k in range(3):
        name = f"im{k}"
        cv2.imwrite(str(folder / "images" / f"{name}.png"), rng.integers(0, 255, (80, 80, 3), dtype=np.uint8))
        arrays[f"{name}_xy"] = rng.uniform(5, 75, (12, 2)).astype(np.float32)
        arrays[f"{name}_cls"] = np.array([1, 2, 3] * 4, np.int8)
        names.append(name)
    arrays["names"], arrays["split"] = np.array(names), np.array(["train", "train", "val"])
    arrays["mpp"] = np.float32(0.5)
    arrays["class_names"] = np.array(["background", "lymphocyte", "tumour", "stromal"])
    np.savez(folder / "points.npz", **arrays)  # type: ignore[arg-type]
    return folder


def test_point_patches_map_classes_by_name_and_keep_the_split(tmp_path: Path) -> None:
    folder = _point_set(tmp_path / "points", np.random.default_rng(0))
    patches = PointPatches(folder, CLASSES, split="train", radius_um=2.0, mpp=0.5, patch_size=64,
                           options=AugmentOptions.none(), seed=1)
    assert len(patches.items) == 2
    assert patches.counts.tolist() == [0, 0, 8, 8, 8]  # lymphocyte/tumour/stromal → 2/3/4
    weights = patches.class_weights()
    assert weights[:2].tolist() == [0.0, 0.0] and np.allclose(weights[2:], 1.0)
    batch = patches.batch(0, 3)
    assert batch["image"].shape == (3, 3, 64, 64) and batch["tp"].shape == (3, 64, 64)
    assert set(torch.unique(batch["tp"]).tolist()) <= {2, 3, 4, IGNORE}
    assert torch.equal(patches.batch(5, 3)["tp"], patches.batch(5, 3)["tp"])  # reproducible
    with pytest.raises(ValueError, match="works at"):
        PointPatches(folder, CLASSES, split="train", radius_um=2.0, mpp=0.25, patch_size=64,
                     options=patches.options, seed=1)


def _tiny_model(path: Path) -> Path:
    torch.manual_seed(0)
    model = build_conic_tiny(5)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
                module.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
                module.bias.uniform_(-0.2, 0.2)
    model.eval()
    model.margin = 8
    card = ModelCard(name="tiny", architecture="conic-tiny", input_size=64, output_size=48, mpp=0.5,
                     classes=tuple(ClassInfo(name=n, colour=(0, 0, 0)) for n in CLASSES))
    export_onnx(model, card, path)
    return path


def _outputs(path: Path, image: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: image}), strict=True))


@pytest.mark.slow
def test_head_only_fine_tuning_changes_classes_and_nothing_else(tmp_path: Path) -> None:
    source = _tiny_model(tmp_path / "tiny.onnx")
    folder = _point_set(tmp_path / "points", np.random.default_rng(1))
    consep = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "nuclei"
    options = PointFinetuneOptions(points=folder, data_root=consep, typed_sources=("consep_test",),
                                   trainable="head", steps=4, point_batch=2, typed_batch=2,
                                   patch_size=64, lr=1e-2, threads=1)
    out = tmp_path / "tuned.onnx"
    card = finetune_points(source, out, options, name="tiny-points", run_dir=tmp_path / "run")
    assert read_card(out).name == card.name == "tiny-points"
    assert (tmp_path / "run" / "log.jsonl").read_text().count("point_ce") == 1
    image = np.random.default_rng(2).uniform(0, 255, (1, 3, 64, 64)).astype(np.float32)
    before, after = _outputs(source, image), _outputs(out, image)
    assert set(before) == set(after)
    for name in before:
        if name.startswith("tp"):
            assert not np.allclose(before[name], after[name], atol=1e-4)
        else:
            np.testing.assert_allclose(before[name], after[name], atol=1e-4)


def test_the_command_line_names_a_bad_model_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from models.train.point_finetune import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.onnx"), "--name", "x",
              "--points", str(tmp_path), "--data-root", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "missing.onnx" in err and "Traceback" not in err and err.count("\n") == 1
