"""Run the published result rows (every config × seeds) and print their Markdown tables: docs/results.md.

Each run is ``mmsenti train --config CONFIG --set run.seed=S`` into ``runs/results/<row>/seed<S>``; a run whose
``metrics.json`` exists is not run again, so the script resumes after an interruption and can be re-run to add
seeds or rows. Test metrics of the dev-selected model are reported as mean ± std (sample std, n-1) over seeds.

    python scripts/results.py                        # every row, seeds 0 1 2
    python scripts/results.py --only cm-memes --seeds 0
    python scripts/results.py --table-only           # just print the tables from finished runs
    python scripts/results.py --table-only --write   # and write them into docs/results.md and README.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- tables: python scripts/results.py --table-only --write -->", "<!-- end tables -->"
HEAD_BEGIN, HEAD_END = "<!-- headline: python scripts/results.py --table-only --write -->", "<!-- end headline -->"

# (row id, dataset group, description, config, extra --set overrides)
ROWS = [
    ("mvsa-single-text", "MVSA-Single", "INFIG-lite, text only", "configs/lite/mvsa-single-text.yaml", []),
    ("mvsa-single-text-ft4", "MVSA-Single", "INFIG-lite, text only, 4 MiniLM layers fine-tuned (lower dev: not kept)",
     "configs/lite/mvsa-single-text-ft4.yaml", []),
    ("hfm-text", "HFM", "INFIG-lite, text only", "configs/lite/hfm-text.yaml", []),
    ("mvsa-multiple-text", "MVSA-Multiple", "INFIG-lite, text only", "configs/lite/mvsa-multiple-text.yaml", []),
    ("cm-memes", "cm_memes", "INFIG-lite (image + text; w/o CLIP)", "configs/lite/cm-memes.yaml", []),
    ("cm-memes-no-gam", "cm_memes", "INFIG-lite w/o GAM", "configs/lite/cm-memes-no-gam.yaml", []),
    ("cm-memes-no-hfam", "cm_memes", "INFIG-lite w/o HFAM", "configs/lite/cm-memes-no-hfam.yaml", []),
    ("cm-memes-no-gam-hfam", "cm_memes", "INFIG-lite w/o GAM and HFAM", "configs/lite/cm-memes-no-gam-hfam.yaml", []),
    ("cm-memes-text", "cm_memes", "text only (same encoder + fusion)", "configs/lite/cm-memes-text.yaml", []),
    ("cm-memes-image", "cm_memes", "image only (same encoder + fusion)", "configs/lite/cm-memes-image.yaml", []),
    ("mosi-text", "CMU-MOSI", "INFIG-lite text regressor", "configs/lite/mosi-text.yaml", []),
    ("mosi-rahp", "CMU-MOSI", "rahp, text (MiniLM tokens), memory bank", "configs/rahp/mosi-text.yaml", []),
    ("mosi-rahp-none", "CMU-MOSI", "rahp w/o retrieval", "configs/rahp/mosi-text-no-retrieval.yaml", []),
    ("mosei-rahp", "CMU-MOSEI", "rahp, text (MiniLM tokens), memory bank", "configs/rahp/mosei-text.yaml", []),
    ("mosei-rahp-none", "CMU-MOSEI", "rahp w/o retrieval", "configs/rahp/mosei-text-no-retrieval.yaml", []),
    ("cm-memes-rahp", "cm_memes", "rahp (image + text), memory bank", "configs/rahp/cm-memes.yaml", []),
]
# Reference figures of ../shared/data/README.md (same splits, test set, C chosen on dev): accuracy, weighted F1,
# macro F1. cm_memes "test" is its official dev split.
REFERENCE = {
    "MVSA-Single": [("TF-IDF + logistic regression", .6333, .6096, .4703),
                    ("frozen all-MiniLM-L6-v2 mean-pool + LR", .6511, .6410, .5228)],
    "MVSA-Multiple": [("TF-IDF + LR", .6471, .6208, .4439), ("frozen MiniLM + LR", .6953, .6562, .5041)],
    "HFM": [("TF-IDF + LR", .7729, .7732, .7637), ("frozen MiniLM + LR", .7792, .7800, .7715)],
    "cm_memes": [("frozen MiniLM text + LR", .6133, .6014, .5783),
                 ("frozen EfficientNet-Lite0 image + LR", .4933, .4683, .4421),
                 ("concat text + image + LR", .5800, .5690, .5431)],
}
# README headline rows: (row id, data, model, reference: (short name, REFERENCE group, index) or None);
# classification rows report weighted F1 (the reference's too, read from REFERENCE), regression rows MAE and corr.
HEADLINE = [
    ("mvsa-single-text", "MVSA-Single (text only)", "INFIG-lite", ("frozen MiniLM + LR", "MVSA-Single", 1)),
    ("hfm-text", "HFM (text only)", "INFIG-lite", ("frozen MiniLM + LR", "HFM", 1)),
    ("mvsa-multiple-text", "MVSA-Multiple (text only)", "INFIG-lite", ("frozen MiniLM + LR", "MVSA-Multiple", 1)),
    ("cm-memes", "cm_memes (image + text)", "INFIG-lite", ("concat MiniLM + EfficientNet + LR", "cm_memes", 2)),
    ("cm-memes-rahp", "cm_memes (image + text)", "rahp", None),
    ("cm-memes-text", "cm_memes (text only)", "INFIG-lite", ("MiniLM + LR", "cm_memes", 0)),
    ("mosi-text", "CMU-MOSI (text only)", "INFIG-lite", None),
    ("mosi-rahp", "CMU-MOSI (text only)", "rahp (memory bank)", None),
    ("mosi-rahp-none", "CMU-MOSI (text only)", "rahp w/o retrieval", None),
    ("mosei-rahp", "CMU-MOSEI (text only)", "rahp (memory bank)", None),
    ("mosei-rahp-none", "CMU-MOSEI (text only)", "rahp w/o retrieval", None),
]
CLASSIFICATION = ("accuracy", "f1_weighted", "f1_macro")
REGRESSION = ("mae", "corr", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc7")


def run_dir(row: str, seed: int) -> Path:
    return ROOT / "runs" / "results" / row / f"seed{seed}"


def run(row: str, config: str, extra: list[str], seed: int) -> bool:
    out = run_dir(row, seed)
    if (out / "metrics.json").is_file():
        return True
    cmd = [sys.executable, "-m", "mmsenti", "train", "--config", config, "--set", f"run.seed={seed}",
           "--set", f"run.out={out}", "--quiet", *sum((["--set", o] for o in extra), [])]
    if (out / "checkpoints" / "last.pt").is_file():
        cmd = [sys.executable, "-m", "mmsenti", "train", "--resume", "--out", str(out), "--quiet"]
    print(f"[{time.strftime('%H:%M:%S')}] {row} seed {seed}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    print(f"  → exit {proc.returncode} after {time.time() - t0:.0f}s", flush=True)
    return proc.returncode == 0


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def scores(row: str, seeds: list[int]) -> list[dict]:
    """Test metrics of the finished runs of ``row`` among ``seeds``."""
    return [json.loads((run_dir(row, s) / "metrics.json").read_text())["test"]
            for s in seeds if (run_dir(row, s) / "metrics.json").is_file()]


def tables(rows, seeds: list[int]) -> str:
    out = []
    for group in dict.fromkeys(r[1] for r in rows):
        done = []
        for row, g, desc, config, extra in rows:
            if g != group:
                continue
            metrics = scores(row, seeds)
            if metrics:
                done.append((row, desc, config, extra, metrics))
        if not done:
            continue
        keys = REGRESSION if "mae" in done[0][4][0] else CLASSIFICATION
        out.append(f"### {group}\n\n| model | seeds | " + " | ".join(keys) + " | command |\n|---|---|"
                   + "---|" * len(keys) + "---|")
        for desc, *ref in REFERENCE.get(group, []) if keys == CLASSIFICATION else []:
            out.append(f"| *reference:* {desc} | – | " + " | ".join(f"{v:.4f}" for v in ref) + " | – |")
        for _row, desc, config, extra, metrics in done:
            cells = [_fmt([m[k] for m in metrics if k in m]) for k in keys]
            cmd = f"`mmsenti train --config {config} --set run.seed=S`" + "".join(f" --set {e}" for e in extra)
            out.append(f"| {desc} | {len(metrics)} | " + " | ".join(cells) + f" | {cmd} |")
        out.append("")
    return "\n".join(out)


def headline(seeds: list[int]) -> str:
    """The README's headline tables: weighted F1 of the classification rows, MAE and corr of the regression rows."""
    cls = ["| data | model | seeds | test weighted F1 | reference |", "|---|---|---|---|---|"]
    reg = ["| data | model | seeds | test MAE | test corr |", "|---|---|---|---|---|"]
    for row, data, model, ref in HEADLINE:
        metrics = scores(row, seeds)
        if not metrics:
            continue
        if "mae" in metrics[0]:
            reg.append(f"| {data} | {model} | {len(metrics)} | {_fmt([m['mae'] for m in metrics])} | "
                       f"{_fmt([m['corr'] for m in metrics])} |")
        else:
            cell = "–" if ref is None else f"{ref[0]} {REFERENCE[ref[1]][ref[2]][2]:.4f}".replace(" 0.", " .")
            cls.append(f"| {data} | {model} | {len(metrics)} | {_fmt([m['f1_weighted'] for m in metrics])} | {cell} |")
    return "\n\n".join("\n".join(t) for t in (cls, reg) if len(t) > 2)


def replace_block(path: Path, begin: str, end: str, body: str) -> None:
    """Replace what lies between the ``begin`` and ``end`` marker lines of ``path`` with ``body``."""
    text = path.read_text()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"{path}: expected one {begin!r} line followed by one {end!r} line")
    head, rest = text.split(begin)
    path.write_text(f"{head}{begin}\n{body.strip()}\n\n{end}{rest.split(end)[1]}")  # blank line: ends a table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", help="row ids or dataset groups")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--write", action="store_true", help=f"replace the tables between the markers of {DOC.name} and {README.name}")
    args = p.parse_args()
    rows = [r for r in ROWS if not args.only or any(o in (r[0], r[1]) for o in args.only)]
    if not args.table_only:
        for seed in args.seeds:  # all rows at one seed first: a partial run still gives every row
            for row, _, _, config, extra in rows:
                if (ROOT / config).is_file():
                    run(row, config, extra, seed)
    print(tables(rows, args.seeds))
    if args.write:  # always every row, so an --only run cannot drop the other groups from the doc
        replace_block(DOC, BEGIN, END, tables(ROWS, args.seeds))
        replace_block(README, HEAD_BEGIN, HEAD_END, headline(args.seeds))


if __name__ == "__main__":
    main()
