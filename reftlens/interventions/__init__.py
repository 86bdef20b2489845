"""Φ: the intervention functions. Nothing here imports TransformerLens."""

from reftlens.interventions.base import Affine, FunctionPhi, Phi, phi_class, register, registered_types, takes_source
from reftlens.interventions.directional import ProjectOut, ReFTr1, Scaled
from reftlens.interventions.patching import Collect, Interchange, MeanAblation, Noise, Steer, ZeroAblation
from reftlens.interventions.reft import ConsReFT, DiReFT, LoBiReFT, LoReFT, NodiReFT, NoReFT
from reftlens.interventions.subspace import DII, OrthonormalRows

__all__ = [
    "Phi",
    "Affine",
    "FunctionPhi",
    "register",
    "phi_class",
    "registered_types",
    "takes_source",
    "Interchange",
    "ZeroAblation",
    "MeanAblation",
    "Steer",
    "Noise",
    "Collect",
    "DII",
    "OrthonormalRows",
    "LoReFT",
    "NoReFT",
    "DiReFT",
    "NodiReFT",
    "ConsReFT",
    "LoBiReFT",
    "Scaled",
    "ProjectOut",
    "ReFTr1",
]
