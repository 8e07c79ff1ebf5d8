"""The model card: everything a caller needs to run a model file, carried inside the file.

Resolution, patch sizes, class names and colours travel with the ONNX file as metadata
(key :data:`CARD_METADATA_KEY`, a JSON document), never typed into callers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from models.errors import ModelCardError
from models.families import BoundaryOptions, Family, HoverOptions, InstanceOptions, contract

__all__ = ["CARD_METADATA_KEY", "PRECISIONS", "ClassInfo", "ModelCard", "Precision", "embed_card",
           "read_card", "replace_card"]

CARD_METADATA_KEY = "hoverserve.card"
"""Name of the ONNX ``metadata_props`` entry holding the card as JSON."""

Precision = Literal["fp32", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16")
"""Weight precisions a model file may have (its inputs and outputs stay float32 in both)."""

class ClassInfo(BaseModel):
    """One nucleus class: its display name and RGB colour (0-255 integers)."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1)
    colour: tuple[int, int, int]

    @field_validator("colour")
    @classmethod
    def _check_colour(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError(f"colour components must be within 0..255, got {value}")
        return value


class ModelCard(BaseModel):
    """Description of a model file.

    ``classes[0]`` is always the background class; ``classes`` is empty for an untyped
    (segmentation-only) model, whose nuclei are all reported as class ``"Nucleus"``.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    name: str
    version: str = "1"
    family: Family = "hover"
    architecture: str = ""
    input_size: int = Field(gt=0, description="Input patch side, pixels")
    output_size: int = Field(gt=0, description="Output patch side (centre of the input), pixels")
    mpp: float = Field(gt=0, description="Working resolution, µm per pixel")
    classes: tuple[ClassInfo, ...] = ()
    postprocess: dict[str, Any] = Field(default_factory=dict)
    training_data: str = ""
    licence: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)
    description: str = ""
    test_time_augmentation: Literal["none", "flip", "dihedral"] = Field(
        "none", description="Transforms averaged inside the graph (flip: 4, dihedral: 8 per patch)"
    )
    precision: Precision = Field(
        "fp32", description="Weights and arithmetic of the graph; inputs and outputs are float32 in both"
    )

    _options: HoverOptions | BoundaryOptions | InstanceOptions = PrivateAttr()

    @model_validator(mode="after")
    def _check_sizes(self) -> ModelCard:
        if self.output_size > self.input_size or (self.input_size - self.output_size) % 2:
            raise ValueError(
                f"output_size {self.output_size} must be <= input_size {self.input_size} "
                "and differ from it by an even number (centre crop)"
            )
        return self

    @model_validator(mode="after")
    def _check_postprocess(self) -> ModelCard:
        # Parsed and checked once here; ``postprocess`` itself stays as the file wrote it (its JSON
        # is part of the run key that nucleus ids derive from).
        self._options = contract(self.family).options.from_mapping(self.postprocess)
        return self

    @model_serializer(mode="wrap")
    def _omit_fp32(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Cards written before the field existed are fp32; leaving the default out keeps their JSON,
        # and so the run key their nucleus ids derive from, exactly as it was.
        data: dict[str, Any] = handler(self)
        if data.get("precision") == "fp32":
            del data["precision"]
        return data

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> ModelCard:
        """A copy; with ``update``, validated again like a loaded card (pydantic's own copy would
        keep the old post-processing options beside a new ``postprocess``)."""
        if not update:
            return super().model_copy(deep=deep)
        return type(self).model_validate({**self.model_dump(), **update})

    @property
    def options(self) -> HoverOptions | BoundaryOptions | InstanceOptions:
        """The card's post-processing, typed by its family (checked when the card was loaded)."""
        return self._options

    @property
    def margin(self) -> int:
        """Pixels lost on each side of an input patch (valid convolutions)."""
        return (self.input_size - self.output_size) // 2

    @property
    def typed(self) -> bool:
        return len(self.classes) > 1

    @property
    def label_channels(self) -> int:
        """Classes a family with a background channel predicts, background included: the card's
        classes, or background and "nucleus" for an untyped card."""
        return max(2, len(self.classes))

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ModelCardError(f"invalid model card: {exc}") from exc


def read_card(path: str | Path) -> ModelCard:
    """Read the card embedded in an ONNX file without loading its weights into a session."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError/OSError and others
        raise ModelCardError(f"cannot read ONNX model {path}: {exc}") from exc
    props = {p.key: p.value for p in proto.metadata_props}
    if CARD_METADATA_KEY not in props:
        raise ModelCardError(
            f"{path} has no HoVerServe model card (metadata key {CARD_METADATA_KEY!r}); "
            "import checkpoints with `hoverserve model import`"
        )
    return ModelCard.from_json(props[CARD_METADATA_KEY])


def card_metadata(card: ModelCard) -> dict[str, str]:
    """Metadata entries to embed in an ONNX file for ``card``."""
    return {CARD_METADATA_KEY: card.to_json(), "hoverserve.card.name": card.name}


def embed_card(proto: Any, card: ModelCard) -> None:
    """Put ``card`` into an ``onnx.ModelProto`` (other metadata entries kept)."""
    import onnx

    props = {p.key: p.value for p in proto.metadata_props}
    props.update(card_metadata(card))
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = card.description or card.name


def replace_card(path: str | Path, output: str | Path, card: ModelCard) -> None:
    """Write ``path``'s graph and weights, unchanged, to ``output`` with ``card`` embedded."""
    import onnx

    read_card(path)  # refuses files that are not HoVerServe models
    proto = onnx.load(str(path))
    embed_card(proto, card)
    onnx.save(proto, str(output))


def _dump(card: ModelCard) -> dict[str, Any]:
    return json.loads(card.to_json())
