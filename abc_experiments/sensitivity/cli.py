"""``abc-sensitivity RUN_DIR``: where a finished run loses its accuracy, layer by layer.

Writes ``RUN_DIR/sensitivity/`` (``sensitivity.json``, ``sensitivity.md``, ``sensitivity.png``) and
prints the table; progress goes to stderr (a bar on a terminal, a line every 30 s otherwise, and
one line per layer). A folder that is not a finished run, or data that cannot be read, ends with
one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "abc-sensitivity"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative: give 0 or more")
    return value


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="For every layer a finished abc-run converted: the validation accuracy with only that layer "
                    "converted and with all but that layer converted, its weight, activation and output errors. "
                    "Writes RUN_DIR/sensitivity/ (JSON, Markdown table, plot) and prints the table.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run dir of a finished abc-run")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="data overrides, e.g. data.root=../shared/datasets")
    parser.add_argument("--batches", type=_count, default=None,
                        help="calibration batches (default: the run's abc.calibration.batches, the same batches)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default: cpu)")
    parser.add_argument("--max-val-images", type=_positive, default=None,
                        help="evaluate on the first this many validation images (default: all)")
    parser.add_argument("--exact", action="store_true",
                        help="recalibrate every 'all but this layer' model from scratch (slower) instead of reusing "
                             "the all-converted model's fits")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/sensitivity)")
    parser.add_argument("--budget", type=float, default=None, metavar="X",
                        help="also propose per-layer M and N costing X times the run's binary operations (M*N*MACs "
                             "per layer), printed as an abc.layers override; reuses RUN_DIR/sensitivity/"
                             "sensitivity.json when there is one")
    parser.add_argument("--max-bases", type=_positive, default=8, help="the most M or N --budget gives a layer")
    parser.add_argument("--remeasure", action="store_true",
                        help="with --budget: measure again even if sensitivity.json exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines stay)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    from ..data import DatasetUnavailableError
    from ..runs import RunError, read_run
    from .budget import propose_assignment
    from .measure import Sensitivity, layer_sensitivity
    from .report import JSON_FILE, OUTPUT_DIR, markdown_table, write_outputs

    out_dir = args.out or args.run_dir / OUTPUT_DIR
    try:
        read_run(args.run_dir)  # refuse a folder that is not a finished run before anything else
        if args.budget is not None and not args.budget > 0:
            raise ValueError(f"--budget {args.budget:g}: give a positive multiple of the run's binary operations")
        measured = out_dir / JSON_FILE
        if args.budget is not None and measured.is_file() and not args.remeasure:
            logging.getLogger(PROG).info("using the measurements in %s (--remeasure measures again)", measured)
            result = Sensitivity.from_dict(json.loads(measured.read_text()))
        else:
            result = layer_sensitivity(args.run_dir, batches=args.batches, device=args.device,
                                       max_val_images=args.max_val_images, overrides=args.overrides,
                                       exact=args.exact, progress=not args.no_progress)
            paths = write_outputs(result, out_dir)
            print(markdown_table(result))
            print(f"wrote {paths['json']}, {paths['table'].name} and {paths['plot'].name} ({result.seconds:.0f} s)")
        if args.budget is not None:
            assignment = propose_assignment(result, args.budget, args.max_bases)
            print(f"\nper-layer bases for {args.budget:g} x the run's binary operations "
                  "(greedy on the measured sensitivities; measure it with abc-run):")
            print(assignment.table())
            print(assignment.override())
    except (RunError, DatasetUnavailableError, ValueError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
