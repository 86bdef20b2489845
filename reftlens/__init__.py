"""reftlens: representation finetuning (ReFT) and causal analysis on TransformerLens hook points.

The public API is this page of names, each the real function (``help()`` shows its parameters).
No module imports TransformerLens or transformers at its top: they load when a model is loaded,
so ``import reftlens`` stays light.
"""

from __future__ import annotations

from reftlens.errors import (
    AnalysisError,
    CollisionError,
    ConfigError,
    ExportError,
    LoadError,
    NonFiniteError,
    PositionError,
    ReftError,
    SaveError,
    StateError,
    TrainingError,
    UnsupportedReplay,
)
from reftlens.export import (
    from_pyreft,
    load_hf,
    load_pyreft,
    merge,
    save_hf,
    save_peft,
    save_pyreft,
    to_hf,
    to_peft,
    to_pyreft,
)
from reftlens.inputs import text_tokens, tokenize
from reftlens.insight import InspectReport, LocalizeResult, inspect, localize
from reftlens.interventions import (
    DII,
    Collect,
    ConsReFT,
    DiReFT,
    Interchange,
    LoBiReFT,
    LoReFT,
    MeanAblation,
    NodiReFT,
    Noise,
    NoReFT,
    OrthonormalRows,
    Phi,
    ProjectOut,
    ReFTr1,
    Scaled,
    Steer,
    ZeroAblation,
    register,
)
from reftlens.model import ReftModel
from reftlens.models import load_model
from reftlens.positions import parse_positions
from reftlens.runtime.bank import SetSettings
from reftlens.sets import Intervention
from reftlens.training import train
from reftlens.version import __version__

__all__ = [
    "train",
    "localize",
    "LocalizeResult",
    "inspect",
    "InspectReport",
    "to_hf",
    "save_hf",
    "load_hf",
    "merge",
    "save_peft",
    "load_pyreft",
    "save_pyreft",
    "to_peft",
    "to_pyreft",
    "from_pyreft",
    "NodiReFT",
    "Intervention",
    "ReftModel",
    "SetSettings",
    "load_model",
    "parse_positions",
    "text_tokens",
    "tokenize",
    "register",
    "Phi",
    "LoReFT",
    "NoReFT",
    "DiReFT",
    "ConsReFT",
    "LoBiReFT",
    "DII",
    "OrthonormalRows",
    "Interchange",
    "ZeroAblation",
    "MeanAblation",
    "Steer",
    "Noise",
    "Collect",
    "Scaled",
    "ProjectOut",
    "ReFTr1",
    "ReftError",
    "PositionError",
    "CollisionError",
    "ConfigError",
    "LoadError",
    "SaveError",
    "ExportError",
    "NonFiniteError",
    "TrainingError",
    "AnalysisError",
    "StateError",
    "UnsupportedReplay",
    "__version__",
]
