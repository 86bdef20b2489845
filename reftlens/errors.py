"""The errors reftlens raises. Each is also a ValueError, so generic handlers still catch it."""


class ReftError(ValueError):
    """Base class of reftlens's input errors."""


class PositionError(ReftError):
    """A position spec cannot be resolved for an input."""


class CollisionError(ReftError):
    """Two interventions would edit the same (hook, layer, position) of one example."""


class ConfigError(ReftError):
    """An intervention does not fit the model (layer, hook, width, device, dtype)."""


class ExportError(ReftError):
    """The interventions cannot be exported to (or run on) a plain transformers model."""


class LoadError(ReftError):
    """A saved set cannot be loaded (missing, corrupt, mismatched or from a newer reftlens)."""


class TrainingError(ReftError):
    """Training cannot go on (a non-finite loss, a bad option, no data)."""


class AnalysisError(ReftError):
    """An analysis cannot run on these inputs."""


class NonFiniteError(ReftError):
    """A source run produced NaN or inf where an intervention would copy it into the base run."""


class SaveError(ReftError):
    """A save would overwrite something that is not an earlier save of the same kind."""


class StateError(LoadError):
    """A pyreft/pyvene checkpoint's tensors do not fit the intervention they are loaded into
    (missing, misshapen or non-float); :func:`reftlens.load_pyreft` adds which intervention."""


class UnsupportedReplay(AnalysisError):
    """A model's blocks cannot be replayed from a recorded run; the sweep falls back to whole
    forwards, so this reaches a user only when they ask for replay by name."""
