"""TSFD-Net (Ilyas et al., Neural Networks 151, 2022): the ``boundary`` model family.

One file per block: :mod:`~models.tsfd.deconv` (colour deconvolution input),
:mod:`~models.tsfd.efficientnet` and :mod:`~models.tsfd.backbone` (EfficientNet trunk),
:mod:`~models.tsfd.tissue` (tissue classifier), :mod:`~models.tsfd.gating`, :mod:`~models.tsfd.bifpn`,
:mod:`~models.tsfd.decoders` (interlinked semantic + boundary decoders), :mod:`~models.tsfd.net`,
:mod:`~models.tsfd.builder` (named sizes) and :mod:`~models.tsfd.export` (ONNX, family contract).

Compute per 256×256 patch (``torch.utils.flop_counter``, 2 FLOPs per multiply-add): ``tsfd``
(B0 trunk, 64-channel pyramid, 3 BiFPN blocks) 7.5 GFLOPs and 4.17 M parameters (16.7 MB of
float32 weights); ``tsfd-tiny`` 1.5 GFLOPs.
"""

from models.tsfd.builder import BUILDERS, SIZES, build_tsfd, build_tsfd_b2, build_tsfd_tiny
from models.tsfd.deconv import HE_STAIN_VECTORS, ColourDeconvolution, stain_matrix
from models.tsfd.export import BOUNDARY_OUTPUTS, check_boundary_onnx, export_boundary_onnx
from models.tsfd.net import TSFDNet

__all__ = [
    "BOUNDARY_OUTPUTS",
    "BUILDERS",
    "HE_STAIN_VECTORS",
    "SIZES",
    "ColourDeconvolution",
    "TSFDNet",
    "build_tsfd",
    "build_tsfd_b2",
    "build_tsfd_tiny",
    "check_boundary_onnx",
    "export_boundary_onnx",
    "stain_matrix",
]
