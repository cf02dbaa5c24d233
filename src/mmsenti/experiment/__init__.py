"""Experiments: seeds × configs grids as files, run resumably in parallel lanes, summarised into tables with
paired significance, cross-validation for small data, and plots. See docs/experiments.md.

* :mod:`~mmsenti.experiment.spec` — the experiment file (rows, seeds, comparisons, references, CV decisions).
* :mod:`~mmsenti.experiment.jobs` — one training run of a row at a seed (and fold): its folder and its results.
* :mod:`~mmsenti.experiment.runner` — `mmsenti experiment run`: the jobs as processes, in parallel lanes.
* :mod:`~mmsenti.experiment.table` — `mmsenti experiment table` (Markdown / CSV / LaTeX, document blocks).
* :mod:`~mmsenti.experiment.significance` — paired bootstrap over posts, pooled over seeds.
* :mod:`~mmsenti.experiment.cv` — training every fold of train+dev (`run.cv_folds`; the folds: :mod:`mmsenti.data.splits`).
* :mod:`~mmsenti.experiment.plots` — bar charts of a table (a model's own plots: :mod:`mmsenti.plots`).
"""

from mmsenti.experiment.spec import Experiment, load_experiment

__all__ = ["Experiment", "load_experiment"]
