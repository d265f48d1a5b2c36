"""``--config run.toml``: flags from a TOML file, and the resolved ``config.toml`` of a run.

A config file holds ``key = value`` lines whose keys are the runner's flags, spelled with ``-``
or ``_`` (``meta-batch = 25`` or ``meta_batch = 25``). The file is turned into the flags it
stands for and put before the command line's, so argparse checks both alike (types, choices,
ranges, the same messages) and a flag given on the command line overrides the file, as a later
flag overrides an earlier one. A ``true`` switch (``quiet = true``) is the flag; ``false`` leaves
it out. A run writes the flags that make it, the resolved configuration, into its folder as
``config.toml``, which ``--config`` reads back into the same run.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._errors import _why
from ._folder import _replacing

if sys.version_info >= (3, 11):
    import tomllib
else:  # the stdlib reads TOML from 3.11 on; tomli is the same parser, a dependency on 3.10
    import tomli as tomllib

CONFIG_FILE = "config.toml"
# flags that say how this invocation treats its folder, not what the run is: never in the file a
# run writes (--config of that file then starts the same run in a new folder)
_NOT_WRITTEN = ("config", "out", "resume", "overwrite")


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's flags by their ``dest`` (``meta_batch``), the names a file's keys map to."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def _read(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict, or a usage error naming the file and the problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"--config {path}: cannot read it ({_why(e)}); pass the path of a TOML file")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # its message ends "(at line L, column C)"
        parser.error(f"--config {path}: not valid TOML ({e}); fix the file there")


def file_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """The flags that the config file at ``path`` stands for, in the command line's words.

    Raises (through ``parser.error``, exit status 2, no traceback) on a file that cannot be read
    or parsed, a key that is not a flag (naming the closest one), a key given twice (``-`` and
    ``_``), or a value that no flag takes (a table, a list, a date; a switch set to a number).
    """
    flags = _flags(parser)
    argv: list[str] = []
    seen: dict[str, str] = {}
    for key, value in _read(path, parser).items():
        dest = key.replace("-", "_")
        if dest not in flags or dest == "config":
            names = [d.replace("_", "-") for d in flags if d != "config"]
            close = difflib.get_close_matches(key.replace("_", "-"), names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]} (--{close[0]})?" if close else "see --help."
            what = "a config file cannot name another" if dest == "config" else "not a flag"
            parser.error(
                f"--config {path}: unknown key {key!r} ({what}); {hint} Keys are the flags' "
                "names, with - or _"
            )
        if dest in seen:
            parser.error(f"--config {path}: {seen[dest]!r} and {key!r} are the same flag; keep one")
        seen[dest] = key
        action = flags[dest]
        flag = action.option_strings[0]
        switch = action.nargs == 0
        if isinstance(value, bool):
            if not switch and action.const is None:  # --compile alone means a default backend
                parser.error(
                    f"--config {path}: {key} = {_toml(value)}: {flag} takes a value, not true "
                    "or false"
                )
            if value:
                argv.append(flag)
        elif switch or not isinstance(value, (int, float, str)):
            expected = "true or false" if switch else "a number or a string"
            parser.error(
                f"--config {path}: {key} = {_toml(value)}: expected {expected}, got "
                f"{type(value).__name__}"
            )
        else:  # checked here too, so that the message names the file
            text = str(value)
            try:
                if callable(action.type):
                    action.type(text)
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                parser.error(f"--config {path}: {key} = {_toml(value)}: {e}")
            if action.choices is not None and text not in action.choices:
                parser.error(
                    f"--config {path}: {key} = {_toml(value)}: expected one of "
                    f"{', '.join(map(str, action.choices))}"
                )
            argv += [flag, text]
    return argv


def _toml(value: Any) -> str:
    """``value`` as a TOML value (JSON's string escapes are TOML's; floats repr exactly)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def render(config: dict[str, Any]) -> str:
    """The text of ``config.toml``: a run's recorded flags (:func:`_cli._config`), less those
    that are no setting (:data:`_NOT_WRITTEN`) and those left unset (``None``: TOML has no
    null, and an absent key is the flag's default)."""
    lines = [
        "# the resolved flags of this run: python -m metafunc train --config <this file> "
        "starts it again",
        "# (in a new folder; flags on the command line override these)",
    ]
    for dest, value in config.items():
        if dest not in _NOT_WRITTEN and value is not None:
            lines.append(f"{dest.replace('_', '-')} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def write(folder: Path, config: dict[str, Any]) -> None:
    """Writes ``config.toml`` into the run's folder, atomically."""
    with _replacing(folder / CONFIG_FILE) as tmp:
        tmp.write_text(render(config), encoding="utf-8")


def with_file(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` with the flags of its ``--config`` file (if any) put before its own."""
    pre = argparse.ArgumentParser(prog=parser.prog, add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return list(argv)
    return [*file_argv(known.config, parser), *argv]
