"""ONNX Runtime IO binding for :meth:`worker.infer.Model.predict`.

With a CUDA provider, ``session.run`` copies each numpy batch from pageable memory to the device
and allocates new host arrays for the outputs every call. The bound path instead copies each batch
into one preallocated host buffer (page-locked when CUDA runs the graph, so the transfer is a DMA
the driver need not stage) and binds the outputs to the slices of the result arrays they belong
in, so ONNX Runtime writes them there and nothing is copied again. On the CPU the same path runs
(for tests), and gives exactly what ``session.run`` gives.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["BoundSession", "pinned_empty"]

logger = logging.getLogger(__name__)

_CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so",
                 "cudart64_12.dll", "cudart64_110.dll")
"""CUDA runtime library names, newest first (ONNX Runtime's CUDA provider has loaded one)."""


def _cudart() -> Any | None:
    for name in _CUDART_NAMES:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def pinned_empty(shape: Sequence[int], dtype: type = np.float32) -> NDArray | None:
    """A page-locked (pinned) host array from ``cudaHostAlloc``, or None without a CUDA runtime.

    The memory is freed with ``cudaFreeHost`` when the array (and every view of it) is gone.

    Parameters
    ----------
    shape : sequence of int
        The array's shape.
    dtype : numpy dtype
        Its element type.

    Returns
    -------
    ndarray or None
    """
    cudart = _cudart()
    if cudart is None:
        return None
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    pointer = ctypes.c_void_p()
    status = cudart.cudaHostAlloc(ctypes.byref(pointer), ctypes.c_size_t(max(1, nbytes)),
                                  ctypes.c_uint(0))
    if status != 0 or not pointer.value:
        logger.warning("cudaHostAlloc of %d bytes failed (CUDA error %d); using pageable memory",
                       nbytes, status)
        return None
    raw = (ctypes.c_byte * max(1, nbytes)).from_address(pointer.value)
    weakref.finalize(raw, cudart.cudaFreeHost, ctypes.c_void_p(pointer.value))
    array: NDArray = np.frombuffer(memoryview(raw), dtype=np.dtype(dtype),
                                   count=nbytes // np.dtype(dtype).itemsize)
    return array.reshape(tuple(shape))


def _static_shape(shape: Sequence[Any]) -> tuple[int, ...] | None:
    """A graph output's shape after the batch axis, or None when any of it is symbolic."""
    rest = tuple(shape[1:])
    return rest if all(isinstance(d, int) and d > 0 for d in rest) else None


class BoundSession:
    """Runs batches of one session through an IO binding.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
        The model's session.
    outputs : sequence of str
        Graph outputs to fetch, in order.
    batch_size : int
        Largest batch one run gets (the host buffer's first axis).
    pinned : bool
        Page-lock the input buffer (only meaningful with a CUDA provider).
    input_name : str
        The graph's image input.
    """

    def __init__(self, session: Any, outputs: Sequence[str], *, batch_size: int, pinned: bool,
                 input_name: str = "image") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.session = session
        self.outputs = tuple(outputs)
        self.batch_size = batch_size
        self.pinned = pinned
        self.input_name = input_name
        meta = {o.name: o for o in session.get_outputs()}
        # Outputs of known float32 shape are written into the result arrays directly; any other
        # (a symbolic channel count) is left to ONNX Runtime to allocate and copied after.
        self._shapes = {name: _static_shape(meta[name].shape) if meta[name].type == "tensor(float)"
                        else None for name in self.outputs}
        self._buffer: NDArray[np.float32] | None = None
        self._lock = threading.Lock()

    def _staging(self, patch_shape: tuple[int, ...]) -> NDArray[np.float32]:
        if self._buffer is None or self._buffer.shape[1:] != patch_shape:
            shape = (self.batch_size, *patch_shape)
            buffer = pinned_empty(shape) if self.pinned else None
            self._buffer = buffer if buffer is not None else np.empty(shape, np.float32)
        return self._buffer

    def run(self, patches: NDArray[np.float32]) -> dict[str, NDArray[np.float32]]:
        """The fetched outputs of (N, 3, H, W) float32 ``patches``, in batches of ``batch_size``."""
        if patches.ndim != 4:
            raise ValueError(f"patches must be (N, 3, H, W), got shape {patches.shape}")
        count = len(patches)
        results: dict[str, NDArray[np.float32]] = {
            name: np.empty((count, *shape), np.float32)
            for name, shape in self._shapes.items() if shape is not None}
        pieces: dict[str, list[NDArray[np.float32]]] = {
            name: [] for name, shape in self._shapes.items() if shape is None}
        with self._lock:
            staging = self._staging(tuple(patches.shape[1:]))
            for start in range(0, count, self.batch_size):
                size = min(self.batch_size, count - start)
                staging[:size] = patches[start : start + size]
                self._run_batch(staging, size, start, results, pieces)
        for name, parts in pieces.items():
            results[name] = np.concatenate(parts) if parts else np.empty((0,), np.float32)
        return {name: results[name] for name in self.outputs}

    def _run_batch(self, staging: NDArray[np.float32], size: int, start: int,
                   results: dict[str, NDArray[np.float32]],
                   pieces: dict[str, list[NDArray[np.float32]]]) -> None:
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cpu", 0, np.float32, [size, *staging.shape[1:]],
                           staging.ctypes.data)
        for name in self.outputs:
            if name in results:
                target = results[name][start : start + size]
                binding.bind_output(name, "cpu", 0, np.float32, list(target.shape), target.ctypes.data)
            else:
                binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        if pieces:
            fetched = dict(zip(self.outputs, binding.copy_outputs_to_cpu(), strict=True))
            for name, parts in pieces.items():
                parts.append(np.asarray(fetched[name], np.float32))
