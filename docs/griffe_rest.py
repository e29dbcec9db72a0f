"""Render the reST roles and literal-block markers of aioresults' docstrings as Markdown.

The package's docstrings use reST (``:param:`` fields, ``:class:`X``` roles,
``::`` before a literal block). mkdocstrings parses the fields; this griffe
extension turns the roles into code spans and ``::`` into ``:``, so the API
pages read cleanly.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# :class:`~aioresults.X` -> `X`; :meth:`Thing.run` -> `Thing.run()`; :func:`f` -> `f()`
_ROLE = re.compile(r":(?:py:)?(class|meth|func|attr|exc|mod|data|obj|const):`(~?)([^`]+)`")
# "text::" at the end of a line introduces a literal block; "::" alone on a line too.
_LITERAL = re.compile(r"(?m)(\S)::$|^(\s*)::$")


def _role(match: re.Match[str]) -> str:
    kind, short, target = match.groups()
    label = target.split("<")[0].strip()
    if short:
        label = label.rsplit(".", 1)[-1]
    if kind in ("meth", "func") and not label.endswith(")"):
        label += "()"
    return f"`{label}`"


def _literal(match: re.Match[str]) -> str:
    return f"{match.group(1)}:" if match.group(1) else f"{match.group(2)}"


def rewrite(text: str) -> str:
    """Return ``text`` with reST roles and ``::`` markers rewritten for Markdown."""
    return _LITERAL.sub(_literal, _ROLE.sub(_role, text))


class ReSTRoles(griffe.Extension):
    """Rewrite every loaded docstring with :func:`rewrite`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
