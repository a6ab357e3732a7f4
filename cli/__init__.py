"""The `quadapt` console script: one subcommand per job, each a thin wrapper around a library call.

One module per command group (`generate`, `batch`, `serve`, `convert`, `onnx`, `train`) adds its
subparsers and holds their handlers: parse, call the library, print. The flags several commands
share are written once in `options.py`, defaulted by the library. Handlers import what they need
when they run, so `quadapt --help` starts in a blink and imports no torch.

stdout carries results only (generated text, perplexity); everything else is a `logging` record
of a `quadapt.*` logger, which `main` prints on stderr as `quadapt: <message>` (-q: warnings only,
-v: debug too). A user's mistake, or a command run without the optional extra it needs, prints
one `quadapt: error: ...` line and exits with status 2 (`batch` reports a bad input line that
way, runs the other lines and exits with 1; a server whose engine died exits with 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from . import batch, convert, generate, onnx, serve, train

logger = logging.getLogger("quadapt.cli")  # named, not __name__: under `python -m` that is "__main__"

# The optional extras (pyproject's [project.optional-dependencies]), by the top-level module that
# a command imports from each; a command run without its extra says which one to install.
EXTRAS = {
    "onnx": "onnx", "onnxruntime": "onnx", "gguf": "gguf", "matplotlib": "train", "triton": "gpu",
    "grpc": "serve", "grpc_health": "serve", "grpc_reflection": "serve", "prometheus_client": "serve",
}


def build_parser() -> argparse.ArgumentParser:
    """The `quadapt` parser with every subcommand; each sets `handler`, called with the parsed args."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="quadapt",
        description="Deployment runtime for quantized, LoRA-adapted language models.",
    )
    parser.add_argument("--version", action="version", version=f"quadapt {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print only warnings and errors on stderr")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="also print debug messages on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (generate, batch, convert, serve, onnx, train):
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `quadapt` command; returns its exit status (argparse exits 2 on a bad flag)."""
    args = build_parser().parse_args(argv)
    from .. import _register_serving_exporter
    from ..runtime.errors import EngineDeadError, QuadaptError

    _register_serving_exporter()  # `--executor onnx` builds its export through the converters

    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    with _log_to_stderr(level):
        try:
            return args.handler(args)
        except EngineDeadError as e:  # not the user's mistake: a supervisor should restart the command
            logger.error("error: %s", e)
            return 1
        except QuadaptError as e:
            logger.error("error: %s", e)
            return 2
        except ModuleNotFoundError as e:
            extra = EXTRAS.get((e.name or "").partition(".")[0])
            if extra is None:
                raise
            logger.error("error: quadapt %s needs the %s package, which is not installed; install it with: "
                         "pip install 'quadapt[%s]'", args.command, e.name, extra)
            return 2
        except KeyboardInterrupt:
            logger.error("interrupted")
            return 130
        except BrokenPipeError:
            return 0


@contextmanager
def _log_to_stderr(level: int) -> Iterator[None]:
    """For one command, print the `quadapt.*` loggers' records at `level` and above on stderr as
    `quadapt: <message>`. Undone on exit, so calling `main` twice in a process prints nothing twice."""
    package = logging.getLogger("quadapt")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("quadapt: %(message)s"))
    saved_level = package.level
    package.addHandler(handler)
    package.setLevel(level)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(saved_level)
