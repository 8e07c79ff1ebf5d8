"""Inference: an ONNX model file run by ONNX Runtime, patch by patch, stitched into region maps."""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from models.card import CARD_METADATA_KEY, ModelCard
from models.errors import ModelCardError
from worker.errors import InferenceError
from worker.options import Device
from worker.plan import Box, tile_boxes
from worker.tile_cache import TileCache

__all__ = ["Device", "Model", "RegionMaps", "load_model", "predict_maps", "provider_options",
           "select_providers"]

logger = logging.getLogger(__name__)


_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")

_GROUPS_AHEAD = 1
"""Patch groups cut and queued behind the one on the network (the inference thread's queue)."""


def select_providers(device: Device, available: Sequence[str]) -> list[str]:
    """ONNX Runtime providers to use, best first: TensorRT → CUDA → CPU.

    ``cuda`` fails when no GPU provider is installed; ``auto`` quietly falls back to the CPU.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    gpu = [p for p in _GPU_PROVIDERS if p in available]
    if device == "cuda" and not gpu:
        raise InferenceError(
            "device 'cuda' requested but this onnxruntime has no CUDA/TensorRT provider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu or use --device cpu"
        )
    chosen = [] if device == "cpu" else gpu
    return [*chosen, "CPUExecutionProvider"]


def provider_options(
    providers: Sequence[str], *, trt_cache: str | Path | None = None, fp16: bool = False,
    batch: tuple[int, int] | None = None,
) -> list[tuple[str, dict[str, str]]]:
    """``providers`` paired with the options ONNX Runtime's ``InferenceSession`` takes for each.

    Parameters
    ----------
    providers : sequence of str
        Provider names, best first (:func:`select_providers`).
    trt_cache : str or Path, optional
        Folder where TensorRT keeps the engines (and timing caches) it builds, so a later session
        on the same model and GPU loads them in seconds instead of building them for minutes.
    fp16 : bool
        Let TensorRT choose float16 kernels (an fp16 model card asks for it, or an option).
    batch : (int, int), optional
        Largest batch and the input patch side: TensorRT builds one engine for every batch of 1
        to that many patches (without it, a region's shorter last batch builds another engine).

    Returns
    -------
    list of (str, dict of str to str)
        Only TensorRT gets options; the others run with ONNX Runtime's defaults.
    """
    def options(name: str) -> dict[str, str]:
        if name != "TensorrtExecutionProvider":
            return {}
        # ONNX Runtime parses these from strings; "True"/"False" is how its documentation spells them.
        settings = {"trt_fp16_enable": str(bool(fp16))}
        if trt_cache is not None:
            folder = str(Path(trt_cache))
            settings.update(trt_engine_cache_enable="True", trt_engine_cache_path=folder,
                            trt_timing_cache_enable="True", trt_timing_cache_path=folder)
        if batch is not None:
            most, side = batch
            settings.update(trt_profile_min_shapes=f"image:1x3x{side}x{side}",
                            trt_profile_opt_shapes=f"image:{most}x3x{side}x{side}",
                            trt_profile_max_shapes=f"image:{most}x3x{side}x{side}")
        return settings

    return [(name, options(name)) for name in providers]


@dataclass(frozen=True, slots=True)
class RegionMaps:
    """Stitched network outputs over a region's ``maps`` box (model pixels).

    ``arrays`` holds one array per map of the model's family (:class:`worker.families.MapSpec`),
    e.g. ``np_prob``, ``hv`` and, for a typed model, the per-pixel argmax class ``types``.
    """

    box: Box
    arrays: Mapping[str, NDArray]
    patches: int = 0
    """Network patches run to make these maps (tiles without tissue are not run)."""

    def __getitem__(self, name: str) -> NDArray:
        return self.arrays[name]

    def get(self, name: str) -> NDArray | None:
        return self.arrays.get(name)


class Model:
    """A loaded model file: its card, an ONNX Runtime session and its family's runner."""

    _thread: ThreadPoolExecutor | None = None
    """The inference thread, started by the first :meth:`submit`."""

    def __init__(self, session, card: ModelCard, path: Path, *, batch_size: int,
                 io_binding: bool | None = None) -> None:
        """``io_binding``: run batches through ONNX Runtime's IO binding (:mod:`worker.binding`);
        None (default) binds when a CUDA or TensorRT provider is active, keeps ``session.run`` on
        the CPU."""
        from worker.binding import BoundSession
        from worker.families import runner_for

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.session = session
        self.card = card
        self.path = path
        self.batch_size = batch_size
        available = [o.name for o in session.get_outputs()]
        try:
            self.runner = runner_for(card)
            self.outputs = self.runner.network_outputs(card, available)
        except ValueError as exc:
            raise InferenceError(f"model {path}: {exc}") from exc
        self.map_specs = self.runner.map_specs(card, self.outputs)
        self.typed = self.runner.typed(card, self.outputs)
        on_gpu = any(p in _GPU_PROVIDERS for p in session.get_providers())
        bind = (on_gpu if io_binding is None else io_binding) and not self.runner.whole_box
        self.bound: BoundSession | None = (
            BoundSession(session, self.outputs, batch_size=batch_size, pinned=on_gpu) if bind else None)

    def __repr__(self) -> str:
        return f"Model({self.card.name!r}, providers={self.session.get_providers()})"

    def submit(self, patches: NDArray[np.float32]) -> Future[dict[str, NDArray[np.float32]]]:
        """:meth:`predict` on this model's inference thread: the caller prepares the next batch
        (cutting patches, reading, stitching) while the network runs, which releases the GIL."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="inference")
        return self._thread.submit(self.predict, patches)

    def predict(self, patches: NDArray[np.float32]) -> dict[str, NDArray[np.float32]]:
        """Run (N, 3, H, W) float32 RGB 0–255 patches in batches; returns contract outputs."""
        if self.bound is not None:
            try:
                return self.bound.run(patches)
            except Exception as exc:  # onnxruntime raises its own non-exported exception types
                raise InferenceError(f"model {self.path.name} failed on a batch: {exc}") from exc
        wanted = list(self.outputs)
        chunks: dict[str, list[NDArray[np.float32]]] = {k: [] for k in wanted}
        for start in range(0, len(patches), self.batch_size):
            batch = np.ascontiguousarray(patches[start : start + self.batch_size])
            try:
                results = self.session.run(wanted, {"image": batch})
            except Exception as exc:  # onnxruntime raises its own non-exported exception types
                raise InferenceError(f"model {self.path.name} failed on a batch: {exc}") from exc
            for key, value in zip(wanted, results, strict=True):
                chunks[key].append(value)
        return {k: np.concatenate(v) for k, v in chunks.items()}

    def empty_maps(self, box: Box) -> RegionMaps:
        """Zero-filled maps of this model's family over ``box``."""
        return RegionMaps(box, {spec.name: np.zeros(spec.shape(box.height, box.width), spec.dtype)
                                for spec in self.map_specs})


def load_model(
    path: str | Path,
    *,
    device: Device = "auto",
    batch_size: int = 8,
    threads: int | None = None,
    trt_cache: str | Path | None = None,
    trt_fp16: bool = False,
    io_binding: bool | None = None,
) -> Model:
    """Open an ONNX model file with its embedded card.

    ``trt_cache`` (a folder, created if missing) keeps TensorRT's engines between runs;
    ``trt_fp16`` lets TensorRT use float16 kernels, as it always may for a model whose card says
    ``precision: fp16``. Both matter only where the TensorRT provider runs. ``io_binding``: see
    :class:`Model`.

    Raises
    ------
    InferenceError
        The file is missing, not ONNX, has no HoVerServe card, or the device is unavailable.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"model file not found: {path}")
    providers = select_providers(device, ort.get_available_providers())
    batch: tuple[int, int] | None = None
    if "TensorrtExecutionProvider" in providers:
        ahead = _card_before_session(path)
        trt_fp16 = trt_fp16 or ahead.precision == "fp16"
        batch = (batch_size, ahead.input_size)
        if trt_cache is not None:
            try:
                Path(trt_cache).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InferenceError(f"cannot create the TensorRT cache folder {trt_cache}: {exc}") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or (os.cpu_count() or 1)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The arena keeps its high-water mark for the process' life; patch batches are uniform, so
    # plain allocations cost little and keep the footprint at what the current batch needs.
    options.enable_cpu_mem_arena = False
    try:
        session = ort.InferenceSession(
            str(path), sess_options=options,
            providers=provider_options(providers, trt_cache=trt_cache, fp16=trt_fp16, batch=batch))
    except Exception as exc:
        raise InferenceError(f"cannot load model {path}: {exc}") from exc
    meta = session.get_modelmeta().custom_metadata_map
    if CARD_METADATA_KEY not in meta:
        raise InferenceError(
            f"{path} has no HoVerServe model card; import official checkpoints with "
            "`hoverserve model import` or export your own with `hoverserve model export`"
        )
    try:
        card = ModelCard.from_json(meta[CARD_METADATA_KEY])
    except ModelCardError as exc:  # its post-processing options included: a bad card fails here
        raise InferenceError(f"{path}: {exc}") from exc
    logger.info("loaded model %s (%s) with providers %s", card.name, path, session.get_providers())
    return Model(session, card, path, batch_size=batch_size, io_binding=io_binding)


def _card_before_session(path: Path) -> ModelCard:
    """The card, read before a session exists (TensorRT's options depend on it)."""
    from models.card import read_card

    try:
        return read_card(path)
    except ModelCardError as exc:
        raise InferenceError(str(exc)) from exc


def predict_maps(
    model: Model,
    image: NDArray[np.uint8],
    image_box: Box,
    maps_box: Box,
    *,
    tile_wanted: Callable[[Box], bool] | None = None,
    out: RegionMaps | None = None,
    cache: TileCache | None = None,
    shared: Callable[[Box], bool] | None = None,
) -> RegionMaps:
    """Tile ``image`` (pixels of ``image_box``), run the model and stitch maps over ``maps_box``.

    ``image_box`` must be ``maps_box`` grown by the model's margin. Tiles for which
    ``tile_wanted`` is false (no tissue, outside the slide) are not run and stay background.
    ``out``, when given, receives the maps (zero-filled buffers of the right shapes) instead of
    new arrays. With a ``cache``, tiles for which ``shared`` is true (other regions need them
    too) are read from it when there, and stored in it when run. ``patches`` counts the tiles
    run here.
    """
    card = model.card
    size, margin = card.output_size, card.margin
    if image_box != maps_box.grow(margin):
        raise ValueError(f"image box {image_box} must be maps box {maps_box} grown by {margin}")
    if image.shape[:2] != (image_box.height, image_box.width):
        raise ValueError(f"image shape {image.shape} does not match its box {image_box}")
    if out is None:
        out = model.empty_maps(maps_box)
    elif out.box != maps_box or set(out.arrays) != {spec.name for spec in model.map_specs}:
        # Caller-provided (e.g. shared-memory) buffers, zero-filled, shaped like the maps box.
        raise ValueError(f"out maps for {out.box} do not fit {maps_box} / this model")
    if model.runner.whole_box:
        return _predict_box(model, image, maps_box, out, tile_wanted)

    def place(t: Box, tile_maps: Mapping[str, NDArray]) -> None:
        r, c = t.row0 - maps_box.row0, t.col0 - maps_box.col0
        for name, tile in tile_maps.items():
            out.arrays[name][..., r : r + size, c : c + size] = tile

    def kept(t: Box) -> bool:
        return shared is not None and shared(t)

    tiles: list[Box] = []
    for t in tile_boxes(maps_box, tile=size):
        if tile_wanted is not None and not tile_wanted(t):
            continue
        stored = cache.get(t) if cache is not None and kept(t) else None
        if stored is None:
            tiles.append(t)
        else:
            place(t, stored)

    def stitch(group: list[Box], result: Mapping[str, NDArray[np.float32]]) -> None:
        for i, t in enumerate(group):
            tile_maps = model.runner.tile_maps(result, i)
            place(t, tile_maps)
            if cache is not None and kept(t):
                cache.put(t, tile_maps)

    # A bounded queue: one group on the network, the next one cut and waiting behind it.
    running: deque[tuple[list[Box], Future]] = deque()
    chunk = max(1, model.batch_size) * 2  # bounds the float32 patch stack, whatever the region
    try:
        for start in range(0, len(tiles), chunk):
            group = tiles[start : start + chunk]
            patches = np.empty((len(group), 3, card.input_size, card.input_size), np.float32)
            for i, t in enumerate(group):
                r, c = t.row0 - maps_box.row0, t.col0 - maps_box.col0
                patch = image[r : r + card.input_size, c : c + card.input_size]
                patches[i] = patch.transpose(2, 0, 1)
            running.append((group, model.submit(patches)))
            if len(running) > _GROUPS_AHEAD:
                done, future = running.popleft()
                stitch(done, future.result())
        while running:
            done, future = running.popleft()
            stitch(done, future.result())
    finally:
        for _, future in running:  # an error above: nothing keeps running for a lost region
            future.cancel()
    return RegionMaps(out.box, out.arrays, len(tiles))


def _predict_box(model: Model, image: NDArray[np.uint8], maps_box: Box, out: RegionMaps,
                 tile_wanted: Callable[[Box], bool] | None) -> RegionMaps:
    """A ``whole_box`` family's maps: the whole input as one patch, unless no tile of the box
    is wanted. ``patches`` counts the box's wanted tiles, the tile-grid patches it stands for,
    so the manifest's ratio to the covering minimum stays comparable across families."""
    card = model.card
    size = card.output_size
    rows, cols = -(-maps_box.height // size), -(-maps_box.width // size)
    wanted = np.array([tile_wanted is None or tile_wanted(t) for t in tile_boxes(maps_box, tile=size)],
                      bool).reshape(rows, cols)
    if not wanted.any():
        return RegionMaps(out.box, out.arrays, 0)
    patch = np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32)
    result = model.submit(patch).result()
    maps = model.runner.box_maps(result, card, wanted=wanted)
    for name, array in maps.items():
        out.arrays[name][...] = array[..., : maps_box.height, : maps_box.width]
    return RegionMaps(out.box, out.arrays, int(wanted.sum()))
