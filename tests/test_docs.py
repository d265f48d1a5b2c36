"""The documentation site builds in strict mode, with an API page for every module it names.

Runs ``mkdocs build --strict`` (a broken link, a missing anchor or reference, or a notebook that
cannot be rendered fails it) when the docs extra is installed (``pip install -e ".[docs]"``, as
``.ci/run`` does); skipped otherwise, since the test extra does not install it.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_TOOLS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "mkdocs_jupyter")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


pytestmark = pytest.mark.skipif(
    not all(map(_installed, _TOOLS)),
    reason='the docs extra is not installed (pip install ".[docs]")',
)


def _build(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", *options],
        cwd=ROOT,  # the griffe extension's path and the notebook cache are relative to it
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("site")
    done = _build("--site-dir", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_the_api_reference_is_generated_from_the_docstrings(site):
    page = (site / "api" / "metafunc" / "index.html").read_text(encoding="utf-8")
    assert "inner_loop" in page and "Runs an inner optimisation loop" in page  # its docstring
    assert ":func:" not in page and ":class:" not in page  # Sphinx roles read as code


def test_every_module_named_in_mkdocs_yml_has_its_api_page(site):
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    listed = text.split("api_modules:", 1)[1].split("\n\n", 1)[0]
    modules = [line.strip()[2:] for line in listed.splitlines() if line.strip().startswith("- ")]
    assert "metafunc.compat.higher" in modules and len(modules) >= 7
    for module in modules:
        page = site / "api" / module / "index.html"
        assert page.exists(), module
        assert f"{module}" in page.read_text(encoding="utf-8")


def test_the_notebooks_and_how_to_pages_are_rendered(site):
    notebook = site / "notebooks" / "maml_in_30_lines" / "index.html"
    assert "functionalize" in notebook.read_text(encoding="utf-8")
    for page in ("maml", "reptile", "imaml", "leap", "warpgrad"):
        assert (site / "algorithms" / page / "index.html").exists(), page


def test_a_broken_link_fails_the_strict_build(tmp_path):
    """The strictness of this configuration: the same site with one dead link does not build."""
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs, symlinks=True)
    for link in ("notebooks", "benchmarks"):  # relative links: point them at the repository's
        (docs / link).unlink()
        (docs / link).symlink_to(ROOT / link)
    with (docs / "concepts.md").open("a") as f:
        f.write("\nSee [the tape](tape.md).\n")
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    text = text.replace("docs_dir: docs", f"docs_dir: {docs}").replace(
        "paths: [.]", f"paths: [{ROOT}]"
    )
    text = text.replace("- docs/_hooks.py", f"- {docs / '_hooks.py'}")
    config = tmp_path / "mkdocs.yml"
    config.write_text(text, encoding="utf-8")
    done = _build("-f", str(config), "--site-dir", str(tmp_path / "site"))
    assert done.returncode != 0
    assert "'concepts.md' contains a link 'tape.md', but the target is not found" in done.stderr
