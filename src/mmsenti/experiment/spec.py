"""Experiment files: rows (a config + overrides + a display name) × seeds, comparisons, references, CV decisions.

An experiment file is YAML, typed by the dataclasses below (an unknown key or a wrong type is a one-line error
naming the file, line and field). Paths of configs are relative to the experiment file (like ``_base_``); the
``runs`` directory is relative to where mmsenti runs, like ``run.out``. See docs/experiments.md.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmsenti.config import Config, ConfigError, from_dict, load_config

CLASSIFICATION = ["accuracy", "f1_weighted", "f1_macro"]
REGRESSION = ["mae", "corr", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc7"]


@dataclass
class Row:
    id: str  # run directories are <runs>/<id>/seed<S>; letters, digits, '-', '_', '.'
    config: str  # training config, relative to the experiment file
    name: str = ""  # the model column of the table (default: the id)
    group: str = ""  # the table the row belongs to (default: the dataset name)
    set: list[str] = field(default_factory=list)  # --set overrides, after the experiment's own
    seeds: list[int] | None = None  # default: the experiment's
    # A sweep: {key: [values]} expands this row into one row per combination, with id <id>-<v1>[-<v2>...] and
    # `key=value` overrides; the name may hold {<last part of the key>} placeholders (e.g. {gam_layer}).
    grid: dict[str, Any] = field(default_factory=dict)


@dataclass
class Comparison:
    a: str  # row ids
    b: str
    metrics: list[str] = field(default_factory=lambda: ["auto"])  # auto: the runs' selection metric
    split: Literal["test", "dev"] = "test"


@dataclass
class Headline:
    row: str
    data: str  # the data column
    model: str  # the model column
    reference: str | None = None  # the name of a reference of the row's group, shown with its weighted F1
    label: str | None = None  # how the reference is named in the headline (default: its name)


@dataclass
class Decision:
    name: str
    rows: list[str]  # candidate rows; the one with the best mean dev metric over folds (and seeds) is selected
    metric: str = "auto"  # auto: the runs' selection metric (weighted F1 / MAE)
    # Printed under the decision's heading: how the question came to be asked (e.g. after a test score was seen).
    note: str = ""


@dataclass
class CrossValidation:
    folds: int = 5
    seed: int = 0  # run.cv_seed: which posts go to which fold (the same for every row and seed)
    seeds: list[int] | None = None  # training seeds of the fold runs (default: the experiment's)
    decisions: list[Decision] = field(default_factory=list)
    # selected: after every fold run of a decision has finished, its selected row is trained on the normal
    # train/dev split (epoch chosen on dev) and scored on test, once per seed. none: no test run at all.
    test: Literal["selected", "none"] = "selected"


@dataclass
class Bootstrap:
    samples: int = 2000  # resamples of the test posts
    seed: int = 0
    level: float = 0.95  # of the percentile interval


@dataclass
class ExperimentSpec:
    name: str  # names the experiment's blocks in documents (`--write`)
    rows: list[Row]
    description: str = ""
    runs: str = ""  # where runs go (default runs/experiments/<name>); shared between experiments if equal
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    set: list[str] = field(default_factory=list)  # overrides for every row
    metrics: dict[str, Any] = field(default_factory=dict)  # {classification: [...], regression: [...]} columns
    # {group: [{name, short?, <metric>: value, ...}]}: reference figures printed in the group's table
    references: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # {group: text} printed under the group's heading
    comparisons: list[Comparison] = field(default_factory=list)
    headline: list[Headline] = field(default_factory=list)
    cv: CrossValidation | None = None
    bootstrap: Bootstrap = field(default_factory=Bootstrap)


@dataclass
class Reference:
    name: str
    metrics: dict[str, float]
    short: str | None = None


@dataclass
class Experiment:
    """A loaded experiment file: its spec with the rows' grids expanded and every row's config resolved."""

    spec: ExperimentSpec
    path: Path
    rows: list[Row]
    configs: dict[str, Config]  # row id → resolved config (seed and output not yet set)
    references: dict[str, list[Reference]]
    # (run directory, config.json mtime) of the runs :meth:`Job.check_config` found to be of their row's config
    checked_runs: set[tuple[str, int]] = field(default_factory=set, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def runs_dir(self) -> Path:
        return Path(self.spec.runs or f"runs/experiments/{self.spec.name}")

    def row(self, row_id: str) -> Row:
        return next(r for r in self.rows if r.id == row_id)

    def seeds(self, row: Row, override: list[int] | None = None) -> list[int]:
        return list(override if override is not None else row.seeds if row.seeds is not None else self.spec.seeds)

    def config_path(self, row: Row) -> Path:
        return (self.path.parent / row.config).resolve()

    def overrides(self, row: Row) -> list[str]:
        return [*self.spec.set, *row.set]

    def task(self, row: Row) -> str:
        return task_of(self.configs[row.id])

    def metric_columns(self, task: str) -> list[str]:
        return list(self.spec.metrics.get(task) or (REGRESSION if task == "regression" else CLASSIFICATION))

    def groups(self) -> list[str]:
        return list(dict.fromkeys(r.group for r in self.rows))

    def select(self, only: list[str] | None) -> list[Row]:
        """Rows whose id or group is in ``only`` (all rows when empty); an unknown name is an error. A name that is
        a row id means that row, also when a group has the same name (a group defaults to the dataset's name, which
        a row may share)."""
        if not only:
            return list(self.rows)
        ids = {r.id for r in self.rows}
        unknown = [o for o in only if o not in ids | {r.group for r in self.rows}]
        if unknown:
            raise ConfigError(f"{self.path}: --only {unknown[0]!r}: no such row or group (rows: "
                              f"{', '.join(r.id for r in self.rows)})")
        groups = set(only) - ids
        return [r for r in self.rows if r.id in only or r.group in groups]


def task_of(cfg: Config) -> str:
    """The task a config trains for, read from its data config (without loading the data)."""
    from mmsenti.data.formats.mmsa import MMSAConfig
    from mmsenti.data.synthetic_mmsa import SyntheticMMSADataConfig

    task = getattr(cfg.data, "task", None)  # user files (jsonl/csv) declare theirs
    if task in ("classification", "regression"):
        return task
    return "regression" if isinstance(cfg.data, (MMSAConfig, SyntheticMMSADataConfig)) else "classification"


# ----------------------------------------------------------------------------------------------------- loading
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$")


def _key_lines(node: yaml.Node, prefix: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    """{"rows[2].config": line, ...} for every key and item of a composed YAML document (1-based lines)."""
    out = {} if out is None else out
    out[prefix] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}.{k.value}" if prefix else str(k.value)
            out[key] = k.start_mark.line + 1
            _key_lines(v, key, out)
            out[key] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _key_lines(v, f"{prefix}[{i}]", out)
    return out


def _where(path: Path, lines: dict[str, int], key: str) -> str:
    """``file:line: key`` for the deepest known prefix of ``key``."""
    probe = key
    while probe and probe not in lines:
        probe = re.sub(r"(\.[^.\[\]]*|\[\d+\])$", "", probe)
    return f"{path}:{lines[probe]}" if probe in lines else str(path)


def _error_key(message: str) -> str:
    m = re.match(r"unknown config key '([^']+)'", message) or re.match(r"([\w.\[\]-]+): ", message)
    return m.group(1) if m else ""


def load_experiment(path: str | Path) -> Experiment:
    """Read, type and check an experiment file; every error is one :class:`ConfigError` line naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    text = path.read_text()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML "
                          f"({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    lines = _key_lines(node) if node is not None else {}

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"{_where(path, lines, key)}: {message}")

    for required in ("name", "rows"):
        if required not in data:
            raise fail("", f"missing '{required}'")
    try:
        spec: ExperimentSpec = from_dict(ExperimentSpec, data)
    except ConfigError as e:
        raise fail(_error_key(str(e)), str(e)) from None

    rows: list[Row] = []
    row_keys: dict[str, str] = {}
    for i, row in enumerate(spec.rows):
        for r in _expand(row, f"rows[{i}]", fail):
            if not _ID.match(r.id):
                raise fail(f"rows[{i}].id", f"rows[{i}].id: {r.id!r} is not a usable directory name")
            if r.id in row_keys:
                raise fail(f"rows[{i}].id", f"rows[{i}].id: duplicate row id {r.id!r}")
            row_keys[r.id] = f"rows[{i}]"
            rows.append(r)

    exp = Experiment(spec, path, rows, {}, {})
    for r in rows:
        key = row_keys[r.id]
        if not exp.config_path(r).is_file():
            raise fail(f"{key}.config", f"{key}.config: file not found: {exp.config_path(r)}")
        try:
            exp.configs[r.id] = load_config(exp.config_path(r), exp.overrides(r))
        except ConfigError as e:
            raise fail(key, f"{key} ({r.id}): {e}") from None
        r.name = r.name or r.id
        r.group = r.group or exp.configs[r.id].data.name

    ids = set(row_keys)

    def need_row(key: str, row_id: str) -> None:
        if row_id not in ids:
            raise fail(key, f"{key}: no row {row_id!r} in this experiment")

    for i, c in enumerate(spec.comparisons):
        need_row(f"comparisons[{i}].a", c.a)
        need_row(f"comparisons[{i}].b", c.b)
    for i, h in enumerate(spec.headline):
        need_row(f"headline[{i}].row", h.row)
    for group, refs in spec.references.items():
        exp.references[group] = _references(refs, f"references.{group}", fail)
    for i, h in enumerate(spec.headline):
        group = exp.row(h.row).group
        if h.reference and h.reference not in {r.name for r in exp.references.get(group, [])}:
            raise fail(f"headline[{i}].reference", f"headline[{i}].reference: no reference {h.reference!r} in "
                                                   f"group {group!r}")
    if spec.cv is not None:
        if spec.cv.folds < 2:
            raise fail("cv.folds", f"cv.folds: need at least 2, got {spec.cv.folds}")
        for i, d in enumerate(spec.cv.decisions):
            if len(d.rows) < 2:
                raise fail(f"cv.decisions[{i}].rows", f"cv.decisions[{i}].rows: a decision needs 2 or more rows")
            for j, row_id in enumerate(d.rows):
                need_row(f"cv.decisions[{i}].rows[{j}]", row_id)
    if spec.bootstrap.samples < 100 or not 0.5 < spec.bootstrap.level < 1:
        raise fail("bootstrap", "bootstrap: samples must be >= 100 and level in (0.5, 1)")
    return exp


def _expand(row: Row, key: str, fail) -> list[Row]:
    if not row.grid:
        return [row]
    keys = list(row.grid)
    values = [row.grid[k] if isinstance(row.grid[k], list) else [row.grid[k]] for k in keys]
    if not all(values):
        raise fail(f"{key}.grid", f"{key}.grid: every key needs a non-empty list of values")
    out = []
    for combo in itertools.product(*values):
        leaves = {k.rsplit(".", 1)[-1]: v for k, v in zip(keys, combo, strict=True)}
        try:
            name = row.name.format_map(leaves) if row.name else ""
        except (KeyError, ValueError) as e:
            raise fail(f"{key}.name", f"{key}.name: bad placeholder {e} (grid keys: {', '.join(leaves)})") from None
        if name == row.name:  # no placeholder: say which grid point it is
            name = f"{row.name or row.id} ({', '.join(f'{k}={v}' for k, v in leaves.items())})"
        sets = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                for k, v in zip(keys, combo, strict=True)]
        out.append(Row(id="-".join([row.id, *(str(v) for v in combo)]), config=row.config, name=name,
                       group=row.group, set=[*row.set, *sets], seeds=row.seeds))
    return out


def _references(refs: Any, key: str, fail) -> list[Reference]:
    if not isinstance(refs, list):
        raise fail(key, f"{key}: expected a list of {{name, <metric>: value}}")
    out = []
    for i, r in enumerate(refs):
        k = f"{key}[{i}]"
        if not isinstance(r, dict) or not isinstance(r.get("name"), str):
            raise fail(k, f"{k}: expected a mapping with a 'name'")
        metrics = {m: v for m, v in r.items() if m not in ("name", "short")}
        bad = [m for m, v in metrics.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            raise fail(f"{k}.{bad[0]}", f"{k}.{bad[0]}: expected a number, got {metrics[bad[0]]!r}")
        out.append(Reference(r["name"], {m: float(v) for m, v in metrics.items()}, r.get("short")))
    return out
