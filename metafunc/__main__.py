"""Command line: ``python -m metafunc {train,quickstart} [options]``."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": "meta-train an algorithm on a task family; write a checkpoint, results and a plot",
    "quickstart": "MAML on sinusoid regression from public metafunc names (the README's example)",
}
USAGE = f"usage: python -m metafunc {{{','.join(COMMANDS)}}} [options]"


def _help() -> str:
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name:<12}{text}" for name, text in COMMANDS.items()]
    lines += [
        "",
        "python -m metafunc train --help (or quickstart --help) lists a command's options.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(_help())
        raise SystemExit(0)
    if not argv or argv[0] not in COMMANDS:
        got = repr(argv[0]) if argv else "nothing"
        print(
            f"{USAGE}\n"
            f"python -m metafunc: expected a command, got {got}. "
            "Try: python -m metafunc train --algorithm maml --task sinusoid (or --help)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if argv[0] == "train":
        from . import _train

        _train.main(argv[1:])
        return
    from . import _quickstart

    _quickstart.main(argv[1:])


if __name__ == "__main__":
    main()
