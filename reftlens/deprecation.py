"""Old public names kept working for a while: each warns once per call site and points to the new
name. The list of renames, with the release they are dropped in, is in docs/changelog.md."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable


def deprecated_alias(new: Callable[..., Any], old_name: str) -> Callable[..., Any]:
    """``old_name`` as a deprecated alias of ``new``: same signature, same result, and a
    DeprecationWarning that names the replacement."""

    @functools.wraps(new)
    def alias(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(
            f"reftlens.{old_name} is deprecated; use reftlens.{new.__name__} (same arguments). "
            "See docs/changelog.md for the renames.",
            DeprecationWarning,
            stacklevel=2,
        )
        return new(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old_name
    alias.__doc__ = f"Deprecated alias of :func:`reftlens.{new.__name__}`."
    return alias
