"""``pretrain-report``: the one-page report of a finished pretraining run (:func:`dae.evaluation.write_run_report`)."""

from __future__ import annotations

import argparse

from dae.evaluation.run_report import write_run_report

__all__ = ["COMMANDS", "add_commands", "run"]

COMMANDS = ("pretrain-report",)
"""The subcommands this module adds."""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``pretrain-report`` to the ``dae.cli`` subcommands."""
    report = subparsers.add_parser(
        "pretrain-report",
        help="write a Markdown and HTML page of a finished run: curves, collapse diagnostics, pictures, and the "
        "gain over random initialisation from an evaluation",
        description="Read RUN_DIR's metrics/epochs.jsonl, config.yaml and TensorBoard pictures (and, with "
        "--evaluation, an evaluation's results.json with its pretrained-vs-random-init table) and write index.md and "
        "index.html with the figures to RUN_DIR/report/ (or --output).",
    )
    report.add_argument("run_dir", help="the run folder (e.g. runs/dino_xray_demo)")
    report.add_argument(
        "--evaluation",
        help="an evaluation's results folder or results.json, e.g. runs/xray_eval_demo/evaluation/xray_demo_test",
    )
    report.add_argument("--output", help="the report's folder (default: RUN_DIR/report)")


def run(args: argparse.Namespace) -> None:
    """Write the report and print where it is."""
    path = write_run_report(args.run_dir, evaluation=args.evaluation, output=args.output)
    print(f"Wrote {path} and {path.with_suffix('.html')}.")
