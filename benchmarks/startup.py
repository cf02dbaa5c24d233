"""Start-up time of the command line and of `import mmsenti`, for this tree and (optionally) an older revision.

    python benchmarks/startup.py                        # this tree
    python benchmarks/startup.py --baseline 5950a34     # this tree vs that revision's src/, interleaved runs

Each command runs in a fresh interpreter ``--repeat`` times (before/after alternating, so machine load drifts hit
both alike); the median and minimum wall-clock seconds are printed, with the ratio of medians, the heavy modules
each command imported (read off ``python -X importtime``) and the load average. ``import torch`` alone is printed
as the floor for commands that need torch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "transformers", "timm", "open_clip", "torch._dynamo")
COMMANDS = {
    "mmsenti --help": ["-m", "mmsenti", "--help"],
    "mmsenti list": ["-m", "mmsenti", "list"],
    "import mmsenti": ["-c", "import mmsenti"],
    "import torch (floor)": ["-c", "import torch"],
}


def run(src: Path, args: list[str], importtime: bool = False) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed with {src}:\n{r.stderr[-2000:]}")
    return elapsed, r.stderr


def heavy_modules(src: Path, args: list[str]) -> list[str]:
    _, log = run(src, args, importtime=True)
    seen = {line.rsplit("|", 1)[-1].strip() for line in log.splitlines() if line.startswith("import time:")}
    # A package whose first import failed (torchvision before the compat shim) is logged by its submodules only.
    return [m for m in HEAVY if m in seen or any(s.startswith(m + ".") for s in seen)]


def export_src(rev: str, into: Path) -> Path:
    """``rev``'s ``src/`` (git archive), so both trees run with the same interpreter and packages."""
    archive = into / "src.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "archive", rev, "src"], cwd=ROOT, stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", help="a git revision to compare with (its src/ is exported to a temp dir)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        trees = {"after": ROOT / "src"}
        if args.baseline:
            trees = {"before": export_src(args.baseline, Path(tmp)), **trees}
        times: dict[str, dict[str, list[float]]] = {t: {c: [] for c in COMMANDS} for t in trees}
        for cmd in COMMANDS.values():  # one warm-up each: file-system caches
            for src in trees.values():
                run(src, cmd)
        for _ in range(args.repeat):
            for name, cmd in COMMANDS.items():
                for tree, src in trees.items():
                    times[tree][name].append(run(src, cmd)[0])
        heavy = {t: {c: heavy_modules(src, cmd) for c, cmd in COMMANDS.items() if "floor" not in c}
                 for t, src in trees.items()}

    load = os.getloadavg()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}; {args.repeat} runs each, seconds (median / min)")
    cols = list(trees)
    header = f"{'command':<22}" + "".join(f"{c:>18}" for c in cols) + ("   ratio" if len(cols) == 2 else "")
    print(header)
    for name in COMMANDS:
        med = {t: statistics.median(times[t][name]) for t in cols}
        row = f"{name:<22}" + "".join(f"{med[t]:>9.2f} / {min(times[t][name]):<6.2f}" for t in cols)
        if len(cols) == 2:
            row += f"  {med['before'] / med['after']:>5.1f}×"
        print(row)
    for t in cols:
        for name, mods in heavy[t].items():
            print(f"{t:>6} {name:<16} imports: {', '.join(mods) or '(none of ' + ', '.join(HEAVY) + ')'}")


if __name__ == "__main__":
    main()
