"""`mmsenti experiment table`: mean ± std over seeds per row, paired significance, CV decisions, headline rows.

Everything is computed from the finished runs' ``metrics.json`` and ``predictions/*.npz``; nothing is trained.
``--write DOC`` replaces the experiment's marked blocks of DOC (a Markdown file) with fresh tables::

    <!-- begin experiment lite: tables (mmsenti experiment table experiments/lite.yaml --write docs/results.md) -->
    ...generated...
    <!-- end experiment lite: tables -->

Blocks: ``tables`` (a table per group with its paired comparisons), ``headline`` (the README's short table) and
``cv`` (the cross-validation decisions).
"""

from __future__ import annotations

import csv
import io
import re
import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path

from mmsenti.config import ConfigError
from mmsenti.experiment.jobs import Job, RunResult, display_command, result
from mmsenti.experiment.runner import Outcome, cv_seeds, decide
from mmsenti.experiment.significance import PairedResult, paired_bootstrap
from mmsenti.experiment.spec import Comparison, Experiment, Row

BLOCKS = ("tables", "headline", "cv")
_BEGIN = re.compile(r"^<!-- begin experiment (?P<name>[\w.-]+): (?P<block>[\w-]+)\b.*-->\s*$")


# ------------------------------------------------------------------------------------------------ results
def collect(exp: Experiment, seeds: list[int] | None = None) -> dict[str, list[RunResult]]:
    """Row id → its finished normal (train/dev/test) runs among its seeds, in seed order."""
    out = {}
    for row in exp.rows:
        runs = [result(Job(exp, row, s)) for s in exp.seeds(row, seeds)]
        out[row.id] = [r for r in runs if r is not None and r.test is not None]
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (n-1; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.4f} ± {std:.4f}" if len(values) > 1 else f"{mean:.4f}"


def _task(runs: list[RunResult]) -> str:
    return "regression" if "mae" in runs[0].test else "classification"


def _auto_metric(exp: Experiment, row: Row) -> str:
    from mmsenti.train.trainer import select_metric

    return select_metric(exp.configs[row.id], exp.task(row))


def compare(exp: Experiment, c: Comparison, results: dict[str, list[RunResult]]) -> dict[str, PairedResult] | str:
    """The paired bootstrap of comparison ``c`` over the seeds both rows have, or why it cannot be computed."""
    a = {r.job.seed: r for r in results[c.a]}
    b = {r.job.seed: r for r in results[c.b]}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return "no seed finished by both rows"
    pa, pb = [a[s].predictions(c.split) for s in seeds], [b[s].predictions(c.split) for s in seeds]
    if any(p is None for p in pa + pb):
        return f"no per-post predictions yet (`mmsenti experiment run {exp.path}` fills them in)"
    metrics = [_auto_metric(exp, exp.row(c.a)) if m == "auto" else m for m in c.metrics]
    bs = exp.spec.bootstrap
    return paired_bootstrap(pa, pb, metrics, samples=bs.samples, seed=bs.seed, level=bs.level)  # type: ignore[arg-type]


def _signed(v: float) -> str:
    return f"{v:+.4f}"


def _arrow(metric: str) -> str:
    from mmsenti.metrics import higher_is_better

    return "" if higher_is_better(metric) else " (lower is better)"


# ----------------------------------------------------------------------------------------------- markdown
def comparisons_md(exp: Experiment, comps: list[Comparison], results: dict[str, list[RunResult]]) -> list[str]:
    if not comps:
        return []
    bs = exp.spec.bootstrap
    level = f"{bs.level * 100:g} %"
    out = [f"Paired comparisons: bootstrap over the posts ({bs.samples} resamples, the same draw for every seed of "
           f"both rows), pooled over the seeds both rows have; A − B of the mean over seeds, {level} interval, and "
           f"in how many seeds A is better.", "",
           f"| A | B | metric | split | A − B | {level} interval | A better in |", "|---|---|---|---|---|---|---|"]
    for c in comps:
        names = f"| {exp.row(c.a).name} | {exp.row(c.b).name} |"
        res = compare(exp, c, results)
        if isinstance(res, str):
            out.append(f"{names} {', '.join(c.metrics)} | {c.split} | – | {res} | – |")
            continue
        for m, r in res.items():
            star = " **" if r.excludes_zero else " "
            out.append(f"{names} {m}{_arrow(m)} | {c.split} ({r.posts} posts) |{star}{_signed(r.difference)}"
                       f"{star.strip()} | [{_signed(r.low)}, {_signed(r.high)}] | {r.a_better} of {r.seeds} seeds |")
    out.append("")
    return out


def tables_md(exp: Experiment, results: dict[str, list[RunResult]], rows: list[Row] | None = None) -> str:
    """A table per group: references, then each row's mean ± std over seeds and its command; then comparisons."""
    rows = exp.rows if rows is None else rows
    out: list[str] = []
    for group in exp.groups():
        done = [r for r in rows if r.group == group and results[r.id]]
        if not done:
            continue
        keys = exp.metric_columns(_task(results[done[0].id]))
        out += [f"### {group}", ""]
        if exp.spec.notes.get(group):
            out += [textwrap.fill(" ".join(exp.spec.notes[group].split()), 116), ""]
        out += ["| model | seeds | " + " | ".join(keys) + " | command |", "|---|---|" + "---|" * len(keys) + "---|"]
        for ref in exp.references.get(group, []):
            cells = [f"{ref.metrics[k]:.4f}" if k in ref.metrics else "–" for k in keys]
            out.append(f"| *reference:* {ref.name} | – | " + " | ".join(cells) + " | – |")
        for row in done:
            runs = results[row.id]
            cells = [fmt([r.test[k] for r in runs if k in r.test]) for k in keys]
            out.append(f"| {row.name} | {len(runs)} | " + " | ".join(cells) + f" | `{display_command(exp, row)}` |")
        out.append("")
        ids = {r.id for r in done}  # a comparison is shown under the table of its row B
        out += comparisons_md(exp, [c for c in exp.spec.comparisons if c.b in ids and results[c.a]], results)
    return "\n".join(out).strip() + "\n"


def headline_md(exp: Experiment, results: dict[str, list[RunResult]]) -> str:
    """The README's short tables: weighted F1 of the classification rows, MAE and corr of the regression rows."""
    cls = ["| data | model | seeds | test weighted F1 | reference |", "|---|---|---|---|---|"]
    reg = ["| data | model | seeds | test MAE | test corr |", "|---|---|---|---|---|"]
    for h in exp.spec.headline:
        runs = results[h.row]
        if not runs:
            continue
        if _task(runs) == "regression":
            reg.append(f"| {h.data} | {h.model} | {len(runs)} | {fmt([r.test['mae'] for r in runs])} | "
                       f"{fmt([r.test['corr'] for r in runs])} |")
            continue
        cell = "–"
        if h.reference:
            ref = next(r for r in exp.references[exp.row(h.row).group] if r.name == h.reference)
            cell = f"{h.label or ref.short or ref.name} {ref.metrics['f1_weighted']:.4f}".replace(" 0.", " .")
        cls.append(f"| {h.data} | {h.model} | {len(runs)} | {fmt([r.test['f1_weighted'] for r in runs])} | {cell} |")
    return "\n\n".join("\n".join(t) for t in (cls, reg) if len(t) > 2) + "\n"


def cv_md(exp: Experiment, results: dict[str, list[RunResult]], seeds: list[int] | None = None) -> str:
    """Each decision: mean dev metric over the fold runs per row, the selected row, its test score, and paired
    bootstraps of the selected row against each other candidate on the out-of-fold dev predictions.

    A row not selected shows a test score too when its normal runs exist (made outside this decision, e.g. by an
    experiment sharing the run directories): what was there to be seen is shown, marked as not selected."""
    cv = exp.spec.cv
    if cv is None:
        return ""
    out: list[str] = []
    bs = exp.spec.bootstrap
    for o in decide(exp, seeds):
        d = next(x for x in cv.decisions if x.name == o.name)
        out += [f"### {o.name}", ""]
        if d.note:
            out += [textwrap.fill(" ".join(d.note.split()), 116), ""]
        out += [f"{cv.folds}-fold cross-validation on train+dev (folds fixed by `run.cv_seed={cv.seed}`, the same "
                f"for every row and seed); {o.metric} of each fold run's dev fold, at the epoch selected on it; "
                f"mean ± std over the fold runs. The selected row (best mean) alone is then trained on the normal "
                f"train/dev split and scored on test, once per seed. A test score of a row not selected comes from "
                f"runs made outside this decision (an experiment sharing its run directories), not from it.", "",
                f"| model | fold runs | dev {o.metric} (CV) | selected | test {o.metric} | command |",
                "|---|---|---|---|---|---|"]
        for row_id in d.rows:
            row = exp.row(row_id)
            runs = o.runs[row_id]
            n_seeds = len(o.scores[row_id])
            test = "–"
            vals = [r.test[o.metric] for r in results[row_id] if o.metric in r.test]
            if vals:
                chosen = "" if row_id == o.selected else "; not selected"
                test = f"{fmt(vals)} ({len(vals)} seed{'s' if len(vals) > 1 else ''}{chosen})"
            mark = "✓" if row_id == o.selected else ""
            out.append(f"| {row.name} | {cv.folds} × {n_seeds} | {fmt(runs)} | {mark} | {test} | "
                       f"`{display_command(exp, row, cv=True)}` |")
        out.append("")
        if o.selected:
            out += _cv_comparisons(exp, o, d.rows, seeds, bs)
        else:
            out += ["*Not decided yet: some fold runs are missing (`mmsenti experiment run "
                    f"{exp.path}`).*", ""]
    return "\n".join(out).strip() + "\n"


def oof_predictions(exp: Experiment, row: Row, seed: int):
    """The out-of-fold dev predictions of ``row`` at ``seed`` (every train+dev post once) and each post's fold."""
    import numpy as np

    from mmsenti.metrics import Predictions

    parts, folds = [], []
    for f in range(exp.spec.cv.folds):
        r = result(Job(exp, row, seed, f))
        p = r.predictions("dev") if r else None
        if p is None:
            return None
        parts.append(p)
        folds.append(np.full(len(p.ids), f))
    joined = Predictions(np.concatenate([p.ids for p in parts]), np.concatenate([p.labels for p in parts]),
                         np.concatenate([p.logits for p in parts]), parts[0].task, parts[0].label_names)
    return joined, np.concatenate(folds)


def _cv_comparisons(exp: Experiment, o: Outcome, rows: list[str], seeds, bs) -> list[str]:
    level = f"{bs.level * 100:g} %"
    out = [f"Selected − other, paired bootstrap over the out-of-fold dev predictions (every train+dev post once; "
           f"resampled within folds, {bs.samples} resamples, pooled over seeds):", "",
           f"| selected | other | metric | posts | difference | {level} interval | selected better in |",
           "|---|---|---|---|---|---|---|"]
    sel = exp.row(o.selected)
    for other in rows:
        if other == o.selected:
            continue
        pa, pb, strata = [], [], None
        for s in cv_seeds(exp, seeds):
            x, y = oof_predictions(exp, sel, s), oof_predictions(exp, exp.row(other), s)
            if x is None or y is None:
                continue
            pa.append(x[0])
            pb.append(y[0])
            strata = x[1] if strata is None else strata
        if not pa:
            out.append(f"| {sel.name} | {exp.row(other).name} | {o.metric} | – | – | no predictions | – |")
            continue
        r = paired_bootstrap(pa, pb, [o.metric], samples=bs.samples, seed=bs.seed, level=bs.level,
                             strata=strata)[o.metric]
        star = "**" if r.excludes_zero else ""
        out.append(f"| {sel.name} | {exp.row(other).name} | {o.metric}{_arrow(o.metric)} | {r.posts} | "
                   f"{star}{_signed(r.difference)}{star} | [{_signed(r.low)}, {_signed(r.high)}] | "
                   f"{r.a_better} of {r.seeds} seeds |")
    out.append("")
    return out


def block(exp: Experiment, name: str, results: dict[str, list[RunResult]], seeds: list[int] | None = None) -> str:
    """The text of block ``name`` (one of :data:`BLOCKS`)."""
    if name == "tables":
        if exp.spec.cv is not None:  # only the selected rows have test runs that belong to this experiment
            chosen = {o.selected for o in decide(exp, seeds)}
            return tables_md(exp, results, [r for r in exp.rows if r.id in chosen])
        return tables_md(exp, results)
    if name == "headline":
        return headline_md(exp, results)
    if name == "cv":
        return cv_md(exp, results, seeds)
    raise ConfigError(f"unknown block {name!r} (known: {', '.join(BLOCKS)})")


def markdown(exp: Experiment, seeds: list[int] | None = None) -> str:
    results = collect(exp, seeds)
    parts = [block(exp, "cv", results, seeds)] if exp.spec.cv else []
    parts.append(block(exp, "tables", results, seeds))
    text = "\n".join(p for p in parts if p.strip())
    return text or f"*No finished runs yet: `mmsenti experiment run {exp.path}`.*\n"


# ------------------------------------------------------------------------------------------------- csv / latex
def to_csv(exp: Experiment, seeds: list[int] | None = None) -> str:
    """One line per row (mean and std of every metric), then one line per comparison and metric."""
    results = collect(exp, seeds)
    keys: list[str] = []
    for runs in results.values():
        if runs:
            keys += [k for k in exp.metric_columns(_task(runs)) if k not in keys]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["group", "row", "name", "seeds", *(f"{k}_{s}" for k in keys for s in ("mean", "std")), "command"])
    for row in exp.rows:
        runs = results[row.id]
        if not runs:
            continue
        cells = []
        for k in keys:
            vals = [r.test[k] for r in runs if k in r.test]
            cells += [f"{v:.6f}" for v in mean_std(vals)] if vals else ["", ""]
        w.writerow([row.group, row.id, row.name, len(runs), *cells, display_command(exp, row)])
    if exp.spec.comparisons:
        w.writerow([])
        w.writerow(["a", "b", "metric", "split", "difference", "low", "high", "level", "a_better", "seeds", "posts"])
        for c in exp.spec.comparisons:
            res = compare(exp, c, results)
            if isinstance(res, str):
                continue
            for m, r in res.items():
                w.writerow([c.a, c.b, m, c.split, f"{r.difference:.6f}", f"{r.low:.6f}", f"{r.high:.6f}", r.level,
                            r.a_better, r.seeds, r.posts])
    return buf.getvalue()


_TEX = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
        "^": r"\^{}", "\\": r"\textbackslash{}", "±": r"$\pm$", "→": r"$\rightarrow$", "−": "-"}


def tex(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


def to_latex(exp: Experiment, seeds: list[int] | None = None) -> str:
    """A booktabs table per group (needs ``\\usepackage{booktabs}``); the best mean of each column in bold."""
    from mmsenti.metrics import higher_is_better

    results = collect(exp, seeds)
    out = []
    for group in exp.groups():
        done = [r for r in exp.rows if r.group == group and results[r.id]]
        if not done:
            continue
        keys = exp.metric_columns(_task(results[done[0].id]))
        means = {r.id: {k: mean_std([x.test[k] for x in results[r.id] if k in x.test])
                        for k in keys if any(k in x.test for x in results[r.id])} for r in done}
        best = {}
        for k in keys:
            vals = [means[r.id][k][0] for r in done if k in means[r.id]]
            if vals:
                best[k] = max(vals) if higher_is_better(k) else min(vals)
        out += [r"\begin{table}[t]", r"\centering",
                rf"\caption{{{tex(group)}: test metrics, mean $\pm$ std over seeds.}}",
                rf"\begin{{tabular}}{{lc{'c' * len(keys)}}}", r"\toprule",
                "Model & Seeds & " + " & ".join(tex(k) for k in keys) + r" \\", r"\midrule"]
        refs = exp.references.get(group, [])
        for ref in refs:
            cells = [f"{ref.metrics[k]:.4f}" if k in ref.metrics else "--" for k in keys]
            out.append(rf"\textit{{{tex(ref.name)}}} & -- & " + " & ".join(cells) + r" \\")
        if refs:
            out.append(r"\midrule")
        for r in done:
            cells = []
            for k in keys:
                if k not in means[r.id]:
                    cells.append("--")
                    continue
                m, s = means[r.id][k]
                cell = f"{m:.4f}"
                cells.append((rf"\textbf{{{cell}}}" if abs(m - best[k]) < 5e-5 else cell) + rf" $\pm$ {s:.4f}")
            out.append(f"{tex(r.name)} & {len(results[r.id])} & " + " & ".join(cells) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ documents
def begin_marker(exp: Experiment, name: str, doc: str | Path) -> str:
    return f"<!-- begin experiment {exp.name}: {name} (mmsenti experiment table {exp.path} --write {doc}) -->"


def end_marker(exp_name: str, name: str) -> str:
    return f"<!-- end experiment {exp_name}: {name} -->"


def replace_blocks(doc: str | Path, exp_name: str, render) -> list[str]:
    """Replace the body of every block of experiment ``exp_name`` in ``doc`` by ``render(block_name)``.

    The marker lines and everything outside the blocks are kept; returns the names of the blocks written.
    Raises a one-line :class:`ConfigError` naming the document (and line) when markers are missing or broken.
    """
    doc = Path(doc)
    if not doc.is_file():
        raise ConfigError(f"--write {doc}: file not found")
    lines = doc.read_text().splitlines(keepends=True)
    out: list[str] = []
    written: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _BEGIN.match(line.strip())
        out.append(line)
        i += 1
        if not m or m["name"] != exp_name:
            continue
        name = m["block"]
        if name not in BLOCKS:
            raise ConfigError(f"{doc}:{i}: unknown block {name!r} (known: {', '.join(BLOCKS)})")
        end = end_marker(exp_name, name)
        j = next((k for k in range(i, len(lines)) if lines[k].strip() == end or _BEGIN.match(lines[k].strip())), None)
        if j is None or lines[j].strip() != end:
            raise ConfigError(f"{doc}:{i}: block {exp_name}: {name} has no '{end}' line after it")
        out.append(render(name).strip() + "\n\n")  # a blank line ends a Markdown table
        out.append(lines[j])
        written.append(name)
        i = j + 1
    stray = [k + 1 for k, ln in enumerate(lines) if ln.strip().startswith(f"<!-- end experiment {exp_name}:")]
    if len(stray) != len(written):
        raise ConfigError(f"{doc}:{stray[0] if stray else 1}: an 'end experiment {exp_name}' line without its "
                          f"begin line")
    if not written:
        raise ConfigError(f"{doc}: no block of experiment '{exp_name}' (add the lines '<!-- begin experiment "
                          f"{exp_name}: tables -->' and '{end_marker(exp_name, 'tables')}' where it goes)")
    doc.write_text("".join(out))
    return written


def write(exp: Experiment, docs: Sequence[str | Path], seeds: list[int] | None = None) -> dict[str, list[str]]:
    """Fill the blocks of ``exp`` in every document of ``docs``; {doc: [blocks written]}."""
    results = collect(exp, seeds)
    fold_runs = exp.spec.cv is not None and any(any(o.runs.values()) for o in decide(exp, seeds))
    if not any(results.values()) and not fold_runs:  # never blank a published table for want of runs
        raise ConfigError(f"{exp.path}: no finished runs under {exp.runs_dir}: nothing written "
                          f"(`mmsenti experiment run {exp.path}` first)")
    cache: dict[str, str] = {}

    def render(name: str) -> str:
        if name not in cache:
            cache[name] = block(exp, name, results, seeds)
        return cache[name]

    return {str(d): replace_blocks(d, exp.name, render) for d in docs}
