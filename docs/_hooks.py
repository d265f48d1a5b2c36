"""mkdocs hooks: the navigation sections that follow the repository instead of a list by hand.

- "API reference": one generated page per module named under ``extra.api_modules`` in
  ``mkdocs.yml`` (``api/<module>.md``, a mkdocstrings ``:::`` block), so adding a module to the
  reference is one line there.
- "Notebooks" and "Benchmark scripts": the folder's ``README.md``, then every notebook
  (``notebooks/*.ipynb``) or text (``benchmarks/*.md``) in it, titled by its first heading, so a
  new notebook is on the site (and checked by the strict build) without an edit here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

_SECTION = "API reference"


def _modules(config: Any) -> list[str]:
    return list(config["extra"].get("api_modules", []))


def _page(module: str) -> str:
    return f"api/{module}.md"


# nav section -> (folder under docs/, the pattern of its pages after its README.md)
_FOLDERS = {"Notebooks": ("notebooks", "*.ipynb"), "Benchmark scripts": ("benchmarks", "*.md")}


def _title(path: Path) -> str:
    """A page's first ``# `` heading (a notebook's first markdown cell's), else its name."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        text = "".join("".join(c["source"]) for c in cells[:1] if c["cell_type"] == "markdown")
    else:
        text = path.read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip().strip("`")
    return path.stem.replace("_", " ")


def _folder_pages(docs: Path, folder: str, pattern: str) -> list[Any]:
    pages = sorted(p for p in (docs / folder).glob(pattern) if p.name != "README.md")
    return [f"{folder}/README.md"] + [{_title(p): f"{folder}/{p.name}"} for p in pages]


def on_config(config: Any) -> Any:
    sections = {name for entry in config["nav"] if isinstance(entry, dict) for name in entry}
    missing = ({_SECTION} | _FOLDERS.keys()) - sections
    if missing:
        raise ValueError(f"mkdocs.yml: the nav has no section {sorted(missing)} to fill")
    for entry in config["nav"]:
        if not isinstance(entry, dict):
            continue
        if _SECTION in entry:
            entry[_SECTION] = [{m: _page(m)} for m in _modules(config)]
        for name, (folder, pattern) in _FOLDERS.items():
            if name in entry:
                entry[name] = _folder_pages(Path(config["docs_dir"]), folder, pattern)
    return config


def on_files(files: Files, config: Any) -> Files:
    for module in _modules(config):
        text = f"# `{module}`\n\n::: {module}\n"
        files.append(File.generated(config, _page(module), content=text))
    return files
