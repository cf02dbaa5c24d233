"""``python -m mmsenti.demo RUN_DIR``: the demo's last step — the metrics table and a prediction.

One text is paired with three rendered weathers: a model that reads both modalities changes its answer with
the image, which is the point of the built-in ``scenes`` data.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from mmsenti.data.scenes import render_scene
from mmsenti.inference import load_model
from mmsenti.metrics import format_table

TEXT = "Fingers crossed for sunny skies at the picnic, please not a downpour"


def main(run_dir: str) -> None:
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    print(f"\nmetrics ({run_dir}/metrics.json; model selected on dev):")
    print(format_table(metrics, ["accuracy", "f1_weighted", "f1_macro"]))
    model = load_model(run_dir)
    print(f'\npredictions for the text "{TEXT}" with three images:')
    for kind in ("sun", "rain", "snow"):
        pred = model.predict(TEXT, image=render_scene(kind, random.Random(kind)))
        print(f"  image shows {kind:<5} -> {pred['label']:<8} (p={max(pred['probabilities'].values()):.2f})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart")
