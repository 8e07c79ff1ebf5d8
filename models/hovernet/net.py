"""The HoVer-Net network (Graham et al. 2019), state-dict compatible with the official checkpoints."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from models.hovernet.blocks import UpSample2x, centre_crop
from models.hovernet.decoder import DecoderBranch
from models.hovernet.encoder import HoVerNetEncoder

__all__ = ["MODES", "HoVerNet", "Mode", "ModeSpec"]

Mode = Literal["original", "fast"]


class ModeSpec:
    """Geometry of one HoVer-Net mode.

    Attributes
    ----------
    input_size, output_size : int
        Patch side in and out (the output is the centre of the input).
    kernel_size : int
        Side of the decoder's convolutions.
    pad_stem : bool
        Whether the stem convolution is "same"-padded.
    skip_crops : tuple of int
        Pixels centre-cropped from ``d0`` and ``d1`` before they join the decoder.
    """

    def __init__(
        self, *, input_size: int, output_size: int, kernel_size: int, pad_stem: bool,
        skip_crops: tuple[int, int],
    ) -> None:
        self.input_size = input_size
        self.output_size = output_size
        self.kernel_size = kernel_size
        self.pad_stem = pad_stem
        self.skip_crops = skip_crops

    def __repr__(self) -> str:
        return (
            f"ModeSpec(input_size={self.input_size}, output_size={self.output_size}, "
            f"kernel_size={self.kernel_size}, pad_stem={self.pad_stem}, "
            f"skip_crops={self.skip_crops})"
        )


MODES: dict[str, ModeSpec] = {
    "original": ModeSpec(
        input_size=270, output_size=80, kernel_size=5, pad_stem=False, skip_crops=(184, 72)
    ),
    "fast": ModeSpec(
        input_size=256, output_size=164, kernel_size=3, pad_stem=True, skip_crops=(92, 36)
    ),
}
"""The two official modes."""


class HoVerNet(HoVerNetEncoder):
    """HoVer-Net: shared encoder, decoder branches ``tp`` (typed only), ``np`` and ``hv``.

    Parameters
    ----------
    mode : {"original", "fast"}
        ``original``: 270×270 in, 80×80 out, 5×5 decoder convolutions. ``fast``: 256×256 in,
        164×164 out, 3×3 decoder convolutions and a padded stem.
    nr_types : int or None
        Classes of the type head, background included; ``None`` builds a segmentation-only
        network (no ``tp`` branch).
    """

    def __init__(self, mode: Mode, nr_types: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        if nr_types is not None and nr_types < 2:
            raise ValueError(f"nr_types must be None or >= 2 (background included), got {nr_types}")
        spec = MODES[mode]
        super().__init__(pad_stem=spec.pad_stem)
        self.mode: Mode = mode
        self.spec = spec
        self.nr_types = nr_types
        heads = [("np", 2), ("hv", 2)]
        if nr_types is not None:
            # the official state dict lists the type branch first
            heads.insert(0, ("tp", nr_types))
        self.decoder = nn.ModuleDict(
            {name: DecoderBranch(ch, kernel_size=spec.kernel_size) for name, ch in heads}
        )
        self.upsample2x = UpSample2x()

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        """Head logits of a batch of RGB patches.

        Parameters
        ----------
        image : Tensor, float32, N×3×H×W, 0..255
            RGB patches; the network divides by 255 itself. H = W = ``spec.input_size``.

        Returns
        -------
        dict of str to Tensor
            ``"np"`` N×2×h×w, ``"hv"`` N×2×h×w (x then y), and for a typed network ``"tp"``
            N×nr_types×h×w; all raw logits, h = w = ``spec.output_size``, centred on the input.
        """
        d0, d1, d2, d3 = self.encode(image / 255.0)
        crop0, crop1 = self.spec.skip_crops
        feats = [centre_crop(d0, (crop0, crop0)), centre_crop(d1, (crop1, crop1)), d2, d3]
        return {name: branch(feats, self.upsample2x) for name, branch in self.decoder.items()}
