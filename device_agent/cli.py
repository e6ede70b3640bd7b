"""The device agent's subcommands: ``fedmask predict`` (``agent run`` joins it here later).

Each subcommand has an ``_add_<name>`` function that declares its options and points ``handler`` at
a function importing the real work lazily, so ``fedmask --help`` stays fast and an inference-only
install never needs torch.
"""

from __future__ import annotations

import argparse

from fedmask.config import add_option


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the device agent's subcommands to the ``fedmask`` command."""
    for add in _SUBCOMMANDS:
        add(subparsers)


def _add_predict(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="classify samples with a .tflite model",
        description="Run a .tflite model on the samples in a .npy/.npz file and print the predicted "
        "classes (and the accuracy when the file has labels).",
    )
    add_option(parser, "--model", metavar="FILE", help="the .tflite model")
    parser.add_argument(
        "--input",
        required=True,
        metavar="FILE",
        help=".npy samples, .npz with 'x' (and 'y'), or a device data file (uses x_test/y_test)",
    )
    parser.add_argument("--output", metavar="FILE", help="also write predictions: .json, .csv, .npy or .npz")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--limit", type=int, default=20, metavar="N", help="table rows to print, 0 for all")
    add_option(parser, "--num-threads", type=int, default=1, metavar="N", help="interpreter threads")
    add_option(parser, "--batch-size", type=int, default=256, metavar="N", help="samples per invocation")
    parser.set_defaults(handler=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from fedmask.device_agent.predict import run

    return run(args)


_SUBCOMMANDS = (_add_predict,)
