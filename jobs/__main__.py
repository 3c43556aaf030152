"""The ``fine-pruning`` command (also ``python -m jobs``): one way in to the three programs.

    fine-pruning sweep [flags]     # the defense: python -m jobs.sweep's flags (sweep --help)
    fine-pruning eval CLEAN.h5 [POISONED.h5 ...] MODEL   # the lab's evaluation (eval --help)
    fine-pruning demo              # build (or find) the embedded demo BadNet (demo --help)
"""
from __future__ import annotations

import runpy
import sys

COMMANDS = {"sweep": "jobs.sweep", "eval": "pruning.evaluate", "demo": "pruning.demo"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: no command {argv[0]!r}; give one of {', '.join(COMMANDS)} "
              "(see fine-pruning --help)", file=sys.stderr)
        return 2
    import pruning.data
    pruning.data.INVOKED_AS = f"fine-pruning {argv[0]}"  # what its help and errors call it
    # Each program runs as `python -m MODULE` runs it: as __main__, with its own arguments.
    given, sys.argv = sys.argv, [f"fine-pruning {argv[0]}", *argv[1:]]
    try:
        runpy.run_module(COMMANDS[argv[0]], run_name="__main__", alter_sys=True)  # (ends in SystemExit)
    finally:
        sys.argv = given
    return 0


if __name__ == "__main__":
    sys.exit(main())
