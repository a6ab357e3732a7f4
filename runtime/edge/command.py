"""`quadapt run-onnx`: its parser and handler (not written yet)."""

from __future__ import annotations

import argparse


def add_command(sub: argparse._SubParsersAction) -> None:
    """Add the `run-onnx` subparser to `sub`."""
