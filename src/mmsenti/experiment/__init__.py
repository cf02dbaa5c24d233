"""Experiments: seeds × configs grids as files, run resumably in parallel lanes, summarised into tables with
paired significance, cross-validation for small data, and plots. See docs/experiments.md.

* :mod:`~mmsenti.experiment.spec` — the experiment file (rows, seeds, comparisons, references, CV decisions).
* :mod:`~mmsenti.experiment.runner` — `mmsenti experiment run`.
* :mod:`~mmsenti.experiment.table` — `mmsenti experiment table` (Markdown / CSV / LaTeX, document blocks).
* :mod:`~mmsenti.experiment.significance` — paired bootstrap over posts, pooled over seeds.
* :mod:`~mmsenti.experiment.cv` — stratified folds of train+dev (`run.cv_folds`).
* :mod:`~mmsenti.experiment.plots` — confusion matrix, reliability diagram (ECE), bar charts.
"""

from mmsenti.experiment.spec import Experiment, load_experiment

__all__ = ["Experiment", "load_experiment"]
