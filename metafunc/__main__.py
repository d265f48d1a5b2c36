"""Command line: ``python -m metafunc {train,quickstart} [options]``."""

from __future__ import annotations

import sys

COMMANDS = ("train", "quickstart")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        got = repr(argv[0]) if argv else "nothing"
        print(
            f"usage: python -m metafunc {{{','.join(COMMANDS)}}} [options]\n"
            f"python -m metafunc: expected a command, got {got}. "
            "Try: python -m metafunc train --algorithm maml --task sinusoid",
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
