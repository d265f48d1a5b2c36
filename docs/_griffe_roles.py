"""A griffe extension: metafunc's docstrings as the API pages should read them.

- Sphinx roles (``:func:`inner_loop` ``), which Markdown would show verbatim, become code:
  each ``:role:`target` `` becomes `` `target` `` (``~pkg.mod.name`` becomes ``name``, as in
  Sphinx).
- An ``Example:`` heading becomes ``Examples:``, the Google-style section that griffe renders
  as code (the singular is read as an admonition, whose ``>>>`` lines would be Markdown text).

Only the rendered text changes: the source, and pytest's doctests, are untouched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):`~?([^`]+)`")


def _name(match: re.Match[str]) -> str:
    target = match.group(1)
    if match.group(0).split("`", 1)[1].startswith("~"):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        _rewrite(obj)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _rewrite(pkg)  # on_object does not see the package that was asked for


def _rewrite(obj: griffe.Object) -> None:
    if obj.docstring is not None:
        text = _ROLE.sub(_name, obj.docstring.value)
        obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", text)
