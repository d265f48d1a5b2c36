"""Executes every ``notebooks/*.ipynb`` in-process, and checks that notebooks stay clean.

The project has no jupyter dependency: a notebook is read with :mod:`json` and its code cells are
``exec``'d in order in one fresh namespace, with ``notebooks/`` as the working directory. A failing
cell fails the test with its index and source. Optional peers (higher, torchopt) may only be
imported under ``try: ... except ImportError``, and every notebook that imports one also runs with
the peers made unimportable.
"""

from __future__ import annotations

import ast
import json
import pathlib
import sys
import traceback

import pytest
import torch

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
OPTIONAL_PEERS = ("higher", "torchopt")


def _cells(path: pathlib.Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _source(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def _code_cells(path: pathlib.Path) -> list[tuple[int, str]]:
    """``(index in the notebook, source)`` for every code cell, in order."""
    return [(i, _source(c)) for i, c in enumerate(_cells(path)) if c["cell_type"] == "code"]


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(
        isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names
    )


def _peer_imports(source: str) -> list[tuple[int, bool]]:
    """``(line, guarded)`` for each import of an optional peer; guarded: inside the body of a
    ``try`` whose handlers catch ImportError."""
    tree = ast.parse(source)
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            guarded.update(id(sub) for stmt in node.body for sub in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        if any(m.split(".")[0] in OPTIONAL_PEERS for m in modules):
            found.append((node.lineno, id(node) in guarded))
    return found


def _imports_a_peer(path: pathlib.Path) -> bool:
    return any(_peer_imports(source) for _, source in _code_cells(path))


def _run(path: pathlib.Path) -> None:
    namespace: dict = {"__name__": "__main__"}
    dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        try:
            for index, source in _code_cells(path):
                code = compile(source, f"{path.name}, cell {index}", "exec")
                try:
                    exec(code, namespace)
                except Exception:
                    pytest.fail(
                        f"{path.name}: code cell {index} failed.\n--- cell {index} ---\n{source}\n"
                        f"--- traceback ---\n{traceback.format_exc()}",
                        pytrace=False,
                    )
        finally:
            torch.set_default_dtype(dtype)


CASES = [pytest.param(p, id=p.stem) for p in NOTEBOOKS]


def test_there_are_notebooks_and_an_index():
    assert len(NOTEBOOKS) >= 2
    index = (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in NOTEBOOKS if p.name not in index]
    assert not missing, f"notebooks/README.md does not list {missing}"


@pytest.mark.parametrize("path", CASES)
def test_notebook_is_stored_without_outputs(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert (notebook["nbformat"], notebook["nbformat_minor"]) == (4, 5)
    for i, cell in enumerate(notebook["cells"]):
        assert cell["cell_type"] in ("code", "markdown"), f"cell {i}"
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {i}"


@pytest.mark.parametrize("path", CASES)
def test_optional_peers_are_imported_only_under_a_guard(path):
    unguarded = [
        (index, line)
        for index, source in _code_cells(path)
        for line, guarded in _peer_imports(source)
        if not guarded
    ]
    assert not unguarded, (
        f"{path.name}: (cell, line) {unguarded} import one of {OPTIONAL_PEERS}, which are not "
        f"metafunc dependencies. Import them under try: ... except ImportError: and let the "
        f"notebook run without them."
    )


@pytest.mark.parametrize("path", CASES)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.chdir(path.parent)
    _run(path)


@pytest.mark.parametrize("path", [p for p in CASES if _imports_a_peer(p.values[0])])
def test_notebook_runs_without_optional_peers(path, monkeypatch):
    monkeypatch.chdir(path.parent)
    for name in [m for m in sys.modules if m.split(".")[0] in OPTIONAL_PEERS]:
        monkeypatch.delitem(sys.modules, name)
    for name in OPTIONAL_PEERS:
        monkeypatch.setitem(sys.modules, name, None)  # ``import name`` raises ImportError
    _run(path)
