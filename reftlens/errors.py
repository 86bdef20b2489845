"""The errors reftlens raises. Each is also a ValueError, so generic handlers still catch it."""


class ReftError(ValueError):
    """Base class of reftlens's input errors."""


class PositionError(ReftError):
    """A position spec cannot be resolved for an input."""


class CollisionError(ReftError):
    """Two interventions would edit the same (hook, layer, position) of one example."""


class ConfigError(ReftError):
    """An intervention does not fit the model (layer, hook, width, device, dtype)."""


class SaveError(ReftError):
    """A save would overwrite something that is not an earlier save of the same kind."""
