"""What an explanation costs next to a prediction, per model.

    python benchmarks/explain.py [--repeats 3] [--threads N]

For INFIG on the scenes config (``configs/infig/scenes.yaml``, tiny encoders) and INFIG-lite (MiniLM-L6 +
EfficientNet-Lite0 with their real weights, ``configs/lite/cm-memes.yaml``) it times, for one post (a 320x240
image): a prediction (``Predictor.predict``), an explanation without Integrated Gradients (maps, importance,
modality replacement: 4 forward passes), and with Integrated Gradients at 32 and 64 steps (each step a forward and
a backward pass, text and image separately). INFIG's own layers are randomly initialised: cost does not depend on
training. Prints the median of ``--repeats`` runs and the ratio to a prediction.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def build(config: str):
    from mmsenti.config import load_config
    from mmsenti.inference import Predictor
    from mmsenti.models.base import TaskInfo, build_model
    from mmsenti.models.encoders import build_processor

    cfg = load_config(str(ROOT / config), [])
    texts = [s.text for s in _posts(200)]
    processor = build_processor(cfg.model, texts, "classification")
    model = build_model(cfg.model, TaskInfo("classification", ["negative", "neutral", "positive"]), processor,
                        inference=True)
    return Predictor(model.eval(), processor, cfg)


def _posts(n: int):
    from mmsenti.data.scenes import make_sample

    return [make_sample(i, "test", 0, 240) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    post = _posts(1)[0]
    image = post.image.resize((320, 240))
    print(f"torch threads {torch.get_num_threads()}; one post, image 320x240; median of {args.repeats} runs")
    print("| model | predict | explain, no IG | explain, IG 32 steps | explain, IG 64 steps (default) |")
    print("|---|---|---|---|---|")
    for name, config in (("INFIG scenes (tiny)", "configs/infig/scenes.yaml"),
                         ("INFIG-lite (MiniLM-L6 + EfficientNet-Lite0)", "configs/lite/cm-memes.yaml")):
        pred = build(config)
        runs = {"predict": lambda p=pred: p.predict(post.text, image=image)}
        runs["no IG"] = lambda p=pred: p.explain(post.text, image, integrated_gradients=False)
        for steps in (32, 64):
            runs[f"IG {steps}"] = lambda p=pred, s=steps: p.explain(post.text, image, ig_steps=s)
        cells = []
        base = None
        for key, fn in runs.items():
            fn()  # warm-up
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            base = base or med
            cells.append(f"{med * 1000:.0f} ms" + ("" if key == "predict" else f" ({med / base:.0f}×)"))
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
