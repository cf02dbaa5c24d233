"""The `mmsenti experiment` command line (registered by :mod:`mmsenti.cli`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    x = sub.add_parser("experiment", help="run an experiment file (rows × seeds) and make its tables")
    xs = x.add_subparsers(dest="experiment_command", required=True)
    r = xs.add_parser("run", help="run the missing runs of an experiment file (resumable)")
    r.add_argument("file", help="experiment file (experiments/*.yaml)")
    r.add_argument("--lanes", type=int, default=1, help="runs side by side (default 1)")
    r.add_argument("--threads", type=int, help="torch threads per run (default: CPU cores / lanes)")
    r.add_argument("--only", nargs="+", metavar="ROW", help="row ids or groups (default: every row)")
    r.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the file's)")
    r.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    t = xs.add_parser("table", help="tables of the finished runs: mean ± std over seeds, paired significance")
    t.add_argument("file", help="experiment file")
    t.add_argument("--format", choices=["md", "csv", "latex"], default="md")
    t.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the file's)")
    t.add_argument("--write", action="append", metavar="DOC",
                   help="replace this experiment's marked blocks in DOC (Markdown; repeatable)")
    t.add_argument("--plot", metavar="DIR", help="also write a bar chart per group (PNG) into DIR")
    return x


def run(args: argparse.Namespace) -> int:
    from mmsenti.experiment.spec import load_experiment

    exp = load_experiment(args.file)
    if args.experiment_command == "run":
        from mmsenti.experiment.runner import run_experiment

        return run_experiment(exp, only=args.only, seeds=args.seeds, lanes=args.lanes, threads=args.threads,
                              dry_run=args.dry_run)
    from mmsenti.experiment import table

    text = {"md": table.markdown, "csv": table.to_csv, "latex": table.to_latex}[args.format](exp, args.seeds)
    print(text, end="" if text.endswith("\n") else "\n")
    for doc, blocks in table.write(exp, args.write, args.seeds).items() if args.write else []:
        print(f"wrote {', '.join(blocks)} into {doc}", file=sys.stderr)
    if args.plot:
        from mmsenti.experiment.plots import experiment_bar_charts

        for path in experiment_bar_charts(exp, table.collect(exp, args.seeds), Path(args.plot)):
            print(f"wrote {path}", file=sys.stderr)
    return 0
