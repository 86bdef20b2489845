"""reftlens: representation finetuning (ReFT) and causal analysis on TransformerLens hook points.

The public API is this page of names. TransformerLens and transformers load lazily, only when
a model is loaded, so ``import reftlens`` stays light.
"""

from __future__ import annotations

from reftlens.errors import CollisionError, ConfigError, PositionError, ReftError
from reftlens.interventions import (
    DII,
    Collect,
    ConsReFT,
    DiReFT,
    Interchange,
    LoBiReFT,
    LoReFT,
    MeanAblation,
    Noise,
    NodiReFT,
    NoReFT,
    OrthonormalRows,
    Phi,
    Steer,
    ZeroAblation,
    register,
)
from reftlens.model import ReftModel
from reftlens.positions import parse_positions
from reftlens.sets import Intervention

__version__ = "0.1.0"


def load_model(*args, **kwargs):
    """Load a TransformerLens model offline; see :func:`reftlens.models.load_model`."""
    from reftlens.models import load_model as _load_model

    return _load_model(*args, **kwargs)



def train(*args, **kwargs):
    """Train the Φs of a ReftModel; see :func:`reftlens.training.train`."""
    from reftlens.training import train as _train

    return _train(*args, **kwargs)


def to_hf(*args, **kwargs):
    """Export a ReftModel to a plain transformers model; see :func:`reftlens.export.to_hf`."""
    from reftlens.export import to_hf as _to_hf

    return _to_hf(*args, **kwargs)


def save_hf(*args, **kwargs):
    """Save an exported model; see :func:`reftlens.export.save_hf`."""
    from reftlens.export import save_hf as _save_hf

    return _save_hf(*args, **kwargs)


def load_hf(*args, **kwargs):
    """Load an exported model with transformers alone; see :func:`reftlens.export.load_hf`."""
    from reftlens.export import load_hf as _load_hf

    return _load_hf(*args, **kwargs)


def from_pyreft(*args, **kwargs):
    """Load a pyreft/pyvene save folder onto a model; see :func:`reftlens.export.pyreft.from_pyreft`."""
    from reftlens.export.pyreft import from_pyreft as _from_pyreft

    return _from_pyreft(*args, **kwargs)


def to_pyreft(*args, **kwargs):
    """Write a ReftModel as a pyreft save folder; see :func:`reftlens.export.pyreft.to_pyreft`."""
    from reftlens.export.pyreft import to_pyreft as _to_pyreft

    return _to_pyreft(*args, **kwargs)


__all__ = [
    "train", "to_hf", "save_hf", "load_hf", "from_pyreft", "to_pyreft", "NodiReFT",
    "Intervention", "ReftModel", "load_model", "parse_positions", "register", "Phi",
    "LoReFT", "NoReFT", "DiReFT", "ConsReFT", "LoBiReFT", "DII", "OrthonormalRows",
    "Interchange", "ZeroAblation", "MeanAblation", "Steer", "Noise", "Collect",
    "ReftError", "PositionError", "CollisionError", "ConfigError",
]
