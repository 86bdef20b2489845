"""Griffe extension for the docs build: show Sphinx cross-reference roles as inline code.

The docstrings in ``reftlens/`` are Google style but name other objects with Sphinx roles
(``:func:`reftlens.train```), which mkdocstrings would print literally. This rewrites each role
to inline code when the docs are built; the source docstrings stay as they are (they read well
in ``help()``). A leading ``~`` keeps only the last component, as in Sphinx.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|obj|data|exc):`(~?)([^`]+)`")


def _code(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    if tilde:
        target = target.rsplit(".", 1)[-1]
    return f"``{target}``"


class SphinxRoles(griffe.Extension):
    """Replace ``:role:`target``` with ````target```` in every docstring."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None and ":`" in obj.docstring.value:
            obj.docstring.value = _ROLE.sub(_code, obj.docstring.value)
