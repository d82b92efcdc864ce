"""``hf-fwp``: the command line, a thin layer over the public API.

Subcommands register themselves in :data:`COMMANDS` (name -> (help, add_arguments, run)); user mistakes raise
:class:`CLIError` and are printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import hf_fwp


class CLIError(Exception):
    """A user mistake (bad option, missing file): printed as ``hf-fwp: error: ...`` with exit status 2."""


def _env_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="device to report the auto backend for (default: cuda if present)")


def _env_run(args: argparse.Namespace) -> int:
    import platform

    import torch

    from hf_fwp.ops.dispatch import resolve_backend, triton_available

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        probe = torch.empty(1, 1024, 1, 1, device=device)  # a long prompt: what a prefill would use
    except (RuntimeError, AssertionError) as e:
        raise CLIError(f"device {device!r} is not usable here: {e}") from None
    rows = [
        ("hf-fwp", hf_fwp.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("cuda available", str(torch.cuda.is_available())),
        ("triton importable", str(triton_available())),
        (f"auto backend on {device}", resolve_backend("auto", probe, "env")),
        ("auto backend, decoding", resolve_backend("auto", probe[:, :1], "env")),
    ]
    try:
        import transformers

        rows.insert(3, ("transformers", transformers.__version__))
    except ImportError:
        rows.insert(3, ("transformers", "not installed"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "env": ("print versions and which op backend 'auto' picks", _env_args, _env_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-fwp",
        description="Fast Weight Programmers (linear attention, DeltaNet, Gated DeltaNet) for Hugging Face "
        "Transformers.",
    )
    parser.add_argument("--version", action="version", version=f"hf-fwp {hf_fwp.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except CLIError as e:
        print(f"hf-fwp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
