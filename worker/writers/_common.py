"""Helpers shared by the writers: class tables, stable nucleus ids, paths and JSON in any fsspec
filesystem."""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import fsspec
import numpy as np
from numpy.typing import NDArray

from models.card import ClassInfo

NUCLEUS_CLASS = ClassInfo(name="Nucleus", colour=(0, 160, 255))
"""Class given to every nucleus of an untyped model, and to a typed model's nuclei of type 0."""

NUCLEUS_UUID_NAMESPACE = uuid.UUID("8d06076c-4750-530d-b929-9490fa21882e")
"""Namespace of nucleus UUIDs: ``uuid5(NAMESPACE, f"{seed}/{row}")`` (fixed forever, so a re-run
of the same slide gives the same ids and QuPath recognises a re-import)."""


@dataclass(frozen=True)
class ClassTable:
    """How type indices of a :class:`~worker.nuclei.NucleusTable` map to named, coloured classes.

    ``by_type[t]`` is the class written for a nucleus of type ``t``; ``counted`` lists the
    (type index, class) pairs that counts and count grids report (background excluded).
    """

    typed: bool
    by_type: tuple[ClassInfo, ...]
    counted: tuple[tuple[int, ClassInfo], ...]

    @classmethod
    def from_classes(cls, classes: Sequence[ClassInfo]) -> ClassTable:
        """Build from a model card's ``classes`` (``classes[0]`` background, empty = untyped)."""
        classes = tuple(classes)
        if len(classes) <= 1:
            return cls(False, (NUCLEUS_CLASS,), ((0, NUCLEUS_CLASS),))
        by_type = (NUCLEUS_CLASS, *classes[1:])
        return cls(True, by_type, tuple((i, c) for i, c in enumerate(classes) if i > 0))

    def type_index(self, types: NDArray[np.integer]) -> NDArray[np.intp]:
        """Index into ``by_type`` for each nucleus; raises ValueError on an unknown type."""
        types = np.asarray(types)
        if not self.typed:
            return np.zeros(len(types), np.intp)
        if len(types) and (types.min() < 0 or types.max() >= len(self.by_type)):
            raise ValueError(
                f"nucleus types span {types.min()}..{types.max()} but the card has "
                f"{len(self.by_type)} classes (background included)"
            )
        return types.astype(np.intp)


def nucleus_ids(seed: str, rows: Iterable[int]) -> list[str]:
    """Stable UUID strings of the nuclei at table ``rows`` of the slide identified by ``seed``.

    Each is ``uuid.uuid5(NUCLEUS_UUID_NAMESPACE, f"{seed}/{row}")``, computed with one SHA-1 per
    row and array operations for the version bits and hex layout (3× faster than ``uuid5`` for
    the hundreds of thousands of nuclei of a slide).

    Parameters
    ----------
    seed : str
        Slide identity, e.g. its SHA-256; the same seed and row always give the same UUID.
    rows : iterable of int
        Row indices in the nucleus table.

    Returns
    -------
    list of str
        Canonical lower-case UUIDs.
    """
    if not isinstance(seed, str) or not seed:
        raise ValueError(f"seed must be a non-empty string, got {seed!r}")
    prefix = NUCLEUS_UUID_NAMESPACE.bytes + f"{seed}/".encode()
    digests = b"".join(hashlib.sha1(prefix + str(int(row)).encode()).digest()[:16]
                       for row in rows)
    raw = np.frombuffer(digests, np.uint8).reshape(-1, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x50  # version 5 (RFC 4122 §4.3)
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    text = raw.tobytes().hex()
    return [f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
            for h in (text[i : i + 32] for i in range(0, len(text), 32))]


def join(root: str, name: str) -> str:
    """Path of ``name`` inside directory ``root`` of an fsspec filesystem (always ``/``)."""
    return f"{root.rstrip('/')}/{name}" if root else name


def check_fs(fs: Any) -> None:
    if not isinstance(fs, fsspec.AbstractFileSystem):
        raise TypeError(f"fs must be an fsspec AbstractFileSystem, got {type(fs).__name__}")


def prepare_root(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Create ``root`` (a no-op on object stores) after checking the arguments."""
    check_fs(fs)
    if not isinstance(root, str):
        raise TypeError(f"root must be a str path inside fs, got {type(root).__name__}")
    fs.makedirs(root, exist_ok=True)


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays, paths, sets and tuples turned into JSON types and
    non-finite floats into ``None`` (strict JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "model_dump"):  # pydantic models, e.g. a ModelCard
        return jsonable(value.model_dump(mode="json"))
    return str(value)


def write_json(fs: fsspec.AbstractFileSystem, path: str, document: Any) -> None:
    """Write ``document`` as indented UTF-8 JSON (strict: no NaN) to ``path``."""
    text = json.dumps(jsonable(document), indent=2, ensure_ascii=False, allow_nan=False)
    with fs.open(path, "wb") as fh:
        fh.write(text.encode("utf-8") + b"\n")
