"""The one progress bar every long call shows — training, the analyses, ``collect``: tqdm's (on
stderr, or a widget in a notebook), off with ``progress=False``.

It sits low in the layers so that the engine (a sweep's chunks) and every client can use it.
"""

from __future__ import annotations

from typing import Any

from reftlens.errors import ConfigError


def check_progress(progress: Any, where: str) -> bool:
    """``progress`` as given, refused with a :class:`~reftlens.errors.ConfigError` unless it is a bool
    (``where``: the call it was passed to, named in the message)."""
    if not isinstance(progress, bool):
        raise ConfigError(
            f"{where}: progress must be True (show a progress bar) or False (print nothing); got {progress!r}."
        )
    return progress


def progress_bar(total: int, *, desc: str, enabled: bool = True, initial: int = 0, unit: str = "it") -> Any:
    """A tqdm bar of ``total`` steps (``update(k)`` moves it); with ``enabled=False`` it writes nothing."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit=unit, dynamic_ncols=True)
