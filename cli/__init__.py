"""Command line: ``self-forcing <command>`` or ``python -m self_forcing.cli <command>``.

Each command lives in its own module exposing ``add_parser(subparsers)`` and ``run(args) -> int``
(``convert-lora`` in ``lora``, which also holds ``generate``'s LoRA flags).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("generate", "download", "lora")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="self-forcing", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name in COMMANDS:
        module = importlib.import_module(f".{name}", __name__)
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
