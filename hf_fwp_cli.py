"""Entry point of the ``hf-fwp`` command.

``--version`` and the top-level ``--help`` answer from here without importing torch or transformers (which take
seconds to import); every subcommand runs :func:`hf_fwp.cli.main`. The subcommand names and one-line helps live
here so that both parsers share them.
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = "Fast Weight Programmers (linear attention, DeltaNet, Gated DeltaNet) for Hugging Face Transformers."
COMMAND_HELP = {
    "convert": "turn a pretrained softmax LM into an FWP (no training)",
    "distill": "convert, then distill (attention transfer, LoRA + KL) and save",
    "eval": "perplexity, samples and speed of a student beside its teacher",
    "generate": "generate text with a model",
    "push": "upload a saved model folder to the Hugging Face Hub",
    "env": "print versions and which op backend 'auto' picks",
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("hf-fwp")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def top_parser() -> argparse.ArgumentParser:
    """The command's parser without subcommand options (those need the heavy imports)."""
    parser = argparse.ArgumentParser(prog="hf-fwp", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"hf-fwp {version()}")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in ([], ["-h"], ["--help"], ["--version"]):
        parser = top_parser()
        sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        for name, help_ in COMMAND_HELP.items():
            sub.add_parser(name, help=help_)
        parser.parse_args(argv)  # --help / --version print and exit here
        parser.print_usage(sys.stderr)  # no command: a usage error, as argparse reports one (status 2)
        print("hf-fwp: error: give a command (see hf-fwp --help)", file=sys.stderr)
        return 2
    from hf_fwp.cli import main as run

    return run(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
