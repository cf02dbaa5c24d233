"""Batch prediction speed of the lite models (PyTorch, onnxruntime fp32 and int8), the int8 accuracy change, and
the size of saved models before/after the lean format.

    python benchmarks/inference.py [--posts 256] [--batch-sizes 1 8 32 128] [--workers 1]
    python benchmarks/inference.py --sections onnx --cm-memes-run RUN --mvsa-single-run RUN   # trained runs

For INFIG-lite image+text (MiniLM-L6 + EfficientNet-Lite0, ``configs/lite/cm-memes.yaml``) and its text-only
variant (``configs/lite/cm-memes-text.yaml``) it measures posts/s of ``mmsenti predict --input F --output G``
(``mmsenti.batch_predict.predict_file``: reading the file, decoding + transforming images in DataLoader workers,
tokenizing, the model, writing JSON lines) at each batch size, the batch-1 latency, the peak memory of the process,
and where the time goes at batch 32 (image decode, preprocessing, text and image backbones, INFIG's own layers).
Posts are the real cm_memes memes from ``../shared/data`` when present, else generated scenes posts (224 px).

The backbones carry their real pretrained weights; INFIG's own layers are randomly initialised (untrained): speed
does not depend on training. Each model runs in its own process, so its peak memory is its own.

The ``onnx`` section exports each model (``mmsenti export``, fp32 and ``--quantize int8``, parity-checked on the
dev split) and measures ``mmsenti predict`` posts/s at batch 1 and 32 with the torch backend, onnxruntime fp32 and
onnxruntime int8: same posts, same process, interleaved. With a trained run (``--cm-memes-run``: INFIG-lite on
cm_memes; ``--mvsa-single-run``: the MVSA-Single text-only lite model) it measures that run's model and prints the
int8 model's agreement with fp32 and its change of the dev metric on the run's real dev split (from the export's
parity check); without one it measures the untrained model of the same architecture, and the accuracy change
needs the trained run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
MODELS = {"image+text": "configs/lite/cm-memes.yaml", "text only": "configs/lite/cm-memes-text.yaml"}
# The ONNX section's models: INFIG-lite on cm_memes and the MVSA-Single text-only lite model (same architecture as
# "text only" above); the run options replace them with trained runs.
ONNX_MODELS = {"image+text": ("configs/lite/cm-memes.yaml", "cm_memes_run"),
               "text only": ("configs/lite/mvsa-single-text.yaml", "mvsa_single_run")}
BACKENDS = ("torch", "onnx fp32", "onnx int8")
SIZE_CONFIGS = ["configs/infig/scenes.yaml", "configs/lite/cm-memes.yaml"]
CM_MEMES = ROOT.parent / "shared" / "data" / "cm_memes"


def write_posts(directory: Path, n: int) -> tuple[Path, str]:
    """A JSON-lines file of ``n`` posts with image paths; real memes if available."""
    path = directory / "posts.jsonl"
    rows = []
    if (CM_MEMES / "dev.csv").is_file():
        for split in ("dev", "train"):
            with open(CM_MEMES / f"{split}.csv", encoding="utf-8-sig", newline="") as f:
                rows += [{"id": r["Name"], "text": r["Text"], "image": str(CM_MEMES / "images" / r["Name"])}
                         for r in csv.DictReader(f) if (CM_MEMES / "images" / r["Name"]).is_file()]
        source = f"real cm_memes posts ({CM_MEMES})"
    else:
        from mmsenti.data.scenes import make_sample

        for i in range(n):
            s = make_sample(i, "test", seed=0, image_size=224)
            s.image.save(directory / f"{s.id}.jpg", quality=90)
            rows.append({"id": s.id, "text": s.text, "image": f"{s.id}.jpg"})
        source = "generated scenes posts, 224 px JPEG (../shared/data absent)"
    rows = (rows * (n // max(1, len(rows)) + 1))[:n]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path, source


def build_saved_model(config: str, directory: Path):
    """Build the config's model (pretrained backbones, untrained INFIG layers) and save it as training would."""
    import torch

    from mmsenti.config import load_config
    from mmsenti.models.base import TaskInfo, build_model
    from mmsenti.models.encoders import build_processor
    from mmsenti.models.folder import ModelFolder

    os.chdir(ROOT)  # configs name data roots relative to the repository
    cfg = load_config(config, ["run.quiet=true"])
    if cfg.data.name == "scenes":
        from mmsenti.data.scenes import ScenesConfig, build_scenes

        data = build_scenes(ScenesConfig(**{k: getattr(cfg.data, k) for k in ("num_train", "seed")
                                            if hasattr(cfg.data, k)}, num_dev=0, num_test=0))
        texts, info = [s.text for s in data.splits["train"]], TaskInfo(data.task, data.label_names)
    else:  # the MiniLM tokenizer is pretrained: no training texts needed
        texts, info = [], TaskInfo("classification", ["negative", "neutral", "positive"])
    processor = build_processor(cfg.model, texts, info.task)
    torch.manual_seed(0)
    model = build_model(cfg.model, info, processor).eval()
    ModelFolder.save(directory, model, processor, cfg)
    return model


def saved_sizes(tmp: Path) -> list[dict]:
    """model.safetensors of each size config: everything (as before) vs only what inference reads (now)."""
    from safetensors.torch import save_model

    out = []
    for config in SIZE_CONFIGS:
        d = tmp / Path(config).stem
        model = build_saved_model(config, d)
        save_model(model, str(tmp / "full.safetensors"))  # the old format: the whole state dict
        full, lean = model.state_dict(), model.inference_state_dict()
        out.append({"config": config, "numbers_before": sum(v.numel() for v in full.values()),
                    "numbers_after": sum(v.numel() for v in lean.values()),
                    "mb_before": (tmp / "full.safetensors").stat().st_size / 2**20,
                    "mb_after": (d / "model.safetensors").stat().st_size / 2**20})
    return out


def stage_times(predictor, posts: list[dict], batch_size: int) -> dict[str, float]:
    """Seconds per post spent in each stage at ``batch_size``, in this process (no workers)."""
    import torch

    from mmsenti.data.base import Sample
    from mmsenti.data.processing import open_image

    model, proc = predictor.model, predictor.processor
    timers: dict[str, float] = {"text backbone": 0.0, "image backbone": 0.0}
    starts: dict[str, float] = {}
    modules = {"text backbone": getattr(model, "text_encoder", None)}
    image_encoder = getattr(model, "image_encoder", None)
    modules["image backbone"] = getattr(image_encoder, "backbone", None) if image_encoder is not None else None
    for name, module in modules.items():
        if module is not None:
            module.register_forward_pre_hook(lambda m, a, n=name: starts.__setitem__(n, time.perf_counter()))
            module.register_forward_hook(lambda m, a, o, n=name: timers.__setitem__(
                n, timers[n] + time.perf_counter() - starts[n]))
    decode = prep = total_forward = 0.0
    for i in range(0, len(posts), batch_size):
        chunk = posts[i:i + batch_size]
        t0 = time.perf_counter()
        images = [open_image(p["image"]) for p in chunk] if "image" in predictor.modalities else [None] * len(chunk)
        t1 = time.perf_counter()
        samples = [Sample(id=p["id"], label=None, text=p["text"],
                          image=proc.image_transform(im) if im is not None else None)
                   for p, im in zip(chunk, images, strict=True)]
        batch = predictor.preprocess(samples)
        t2 = time.perf_counter()
        with torch.inference_mode():
            model(batch)
        t3 = time.perf_counter()
        decode, prep, total_forward = decode + t1 - t0, prep + t2 - t1, total_forward + t3 - t2
    n = len(posts)
    out = {"image decode": decode / n, "preprocessing (resize/normalise, tokenize)": prep / n,
           "text backbone": timers["text backbone"] / n, "image backbone": timers["image backbone"] / n}
    out["INFIG layers (image transformer, fusion, head)"] = (total_forward - timers["text backbone"]
                                                             - timers["image backbone"]) / n
    return out


def run_one(model_name: str, args) -> dict:
    """Everything measured for one model (run in its own process)."""
    import torch

    from mmsenti.batch_predict import predict_file
    from mmsenti.data.base import Sample
    from mmsenti.inference import load_model

    tmp = Path(tempfile.mkdtemp(prefix="mmsenti-bench-"))
    build_saved_model(MODELS[model_name], tmp / "model")
    posts_path, source = write_posts(tmp, args.posts)
    posts = [json.loads(x) for x in posts_path.read_text().splitlines()]
    predictor = load_model(tmp / "model", "cpu")
    predict_file(predictor, posts_path, tmp / "warm.jsonl", batch_size=32, workers=0)  # warm-up (first calls)
    rows = []
    for bs in args.batch_sizes:
        n = min(len(posts), args.posts_batch1) if bs == 1 else len(posts)
        small = tmp / f"posts{n}.jsonl"
        small.write_text("".join(json.dumps(p) + "\n" for p in posts[:n]))
        for workers in sorted({args.workers, 0}) if bs == 32 else [args.workers]:
            stats = predict_file(predictor, small, tmp / "out.jsonl", batch_size=bs, workers=workers)
            assert stats.errors == 0, "benchmark posts must all predict"
            rows.append({"batch": bs, "workers": workers, "posts": n, "posts_per_s": stats.posts_per_second})
    # Batch-1 latency of one post, decode included (in-process, as a service's single request).
    lat = []
    for p in posts[: args.posts_batch1]:
        t0 = time.perf_counter()
        predictor.predict_samples([Sample(id=p["id"], label=None, text=p["text"],
                                          image=p["image"] if "image" in predictor.modalities else None)])
        lat.append(1000 * (time.perf_counter() - t0))
    stages = stage_times(predictor, posts, 32)
    return {"model": model_name, "config": MODELS[model_name], "source": source, "rows": rows,
            "latency_ms_p50": statistics.median(lat), "latency_ms_p95": sorted(lat)[int(0.95 * (len(lat) - 1))],
            "stages_ms": {k: 1000 * v for k, v in stages.items()},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def run_onnx(model_name: str, args) -> dict:
    """The ONNX section for one model (run in its own process): exports, then posts/s of the three backends."""
    import torch

    from mmsenti.batch_predict import predict_file
    from mmsenti.export import export_onnx
    from mmsenti.inference import load_model

    config, option = ONNX_MODELS[model_name]
    tmp = Path(tempfile.mkdtemp(prefix="mmsenti-bench-onnx-"))
    run = getattr(args, option)
    os.chdir(ROOT)  # configs name data roots relative to the repository (the parity check reads the dev split)
    if run:
        source = Path(run).resolve()
    else:
        source = tmp / "run"
        build_saved_model(config, source / "model")
    exports, export_s = {}, {}
    for quantize in (None, "int8"):
        t0 = time.perf_counter()
        out, meta = export_onnx(source, tmp / f"onnx-{quantize or 'fp32'}", quantize=quantize,
                                parity_posts=args.parity_posts)
        export_s[quantize or "fp32"] = time.perf_counter() - t0
        exports[quantize or "fp32"] = (out, meta)
    threads = torch.get_num_threads()  # onnxruntime gets the same cores as torch
    predictors = {"torch": load_model(source, "cpu"),
                  "onnx fp32": load_model(exports["fp32"][0], backend="onnx", threads=threads),
                  "onnx int8": load_model(exports["int8"][0], backend="onnx", threads=threads)}
    posts_path, source_text = write_posts(tmp, args.posts)
    posts = posts_path.read_text().splitlines()
    files = {1: tmp / "posts-b1.jsonl", 32: posts_path}
    files[1].write_text("".join(line + "\n" for line in posts[: args.posts_batch1]))
    for p in predictors.values():  # warm-up (first calls allocate)
        predict_file(p, files[1], tmp / "warm.jsonl", batch_size=32, workers=0)
    rows: dict[str, dict[int, list[float]]] = {b: {1: [], 32: []} for b in predictors}
    for _ in range(args.repeats):  # interleaved, so load changes hit every backend alike
        for bs in (1, 32):
            for name, p in predictors.items():
                stats = predict_file(p, files[bs], tmp / "out.jsonl", batch_size=bs, workers=args.workers)
                assert stats.errors == 0, "benchmark posts must all predict"
                rows[name][bs].append(stats.posts_per_second)
    best = {name: {str(bs): max(v) for bs, v in by_bs.items()} for name, by_bs in rows.items()}  # JSON keys
    shutil.rmtree(tmp, ignore_errors=True)
    return {"model": model_name, "config": config, "run": str(run) if run else None, "source": source_text,
            "posts_per_s": best, "threads": threads, "export_s": export_s, "repeats": args.repeats,
            "mb": {k: sum(m["files"].values()) / 2**20 for k, (_, m) in exports.items()},
            "parity": {k: m["parity"] for k, (_, m) in exports.items()}}


def print_onnx(results: list[dict], workers: int) -> None:
    r0 = results[0]
    print(f"\nONNX: mmsenti predict posts/s (workers {workers}), best of {r0['repeats']} interleaved repeats; "
          f"torch threads = onnxruntime threads = {r0['threads']}; posts: {r0['source']}")
    print(f"{'model':<11} {'weights':<40} {'batch':>5} " + " ".join(f"{b:>10}" for b in BACKENDS)
          + f" {'fp32/torch':>10} {'int8/torch':>10}")
    for r in results:
        weights = f"trained run {Path(r['run']).name}" if r["run"] else "untrained (pretrained backbones)"
        for bs in (1, 32):
            v = [r["posts_per_s"][b][str(bs)] for b in BACKENDS]
            print(f"{r['model']:<11} {weights[:40]:<40} {bs:>5} " + " ".join(f"{x:>10.1f}" for x in v)
                  + f" {v[1] / v[0]:>9.2f}x {v[2] / v[0]:>9.2f}x")
    for r in results:
        fp32, int8 = r["parity"]["fp32"], r["parity"]["int8"]
        print(f"\n{r['model']} ({r['run'] or r['config']}): graph {r['mb']['fp32']:.1f} MB fp32, "
              f"{r['mb']['int8']:.1f} MB int8; export {r['export_s']['fp32']:.0f}s / {r['export_s']['int8']:.0f}s")
        print(f"  parity inputs: {fp32['inputs']}")
        print(f"  fp32 vs torch: max |Δlogit| {fp32['fp32']['max_abs_diff']:.2e}, "
              f"agreement {100 * fp32['fp32']['agreement']:.2f} %")
        q = int8["int8"]
        if not r["run"]:
            print(f"  int8 vs torch: max |Δlogit| {q['max_abs_diff']:.2e} (untrained layers: the agreement and the "
                  "accuracy change need a trained run, --cm-memes-run / --mvsa-single-run)")
            continue
        line = f"  int8 vs torch: max |Δlogit| {q['max_abs_diff']:.2e}, agreement {100 * q['agreement']:.2f} %"
        if "metric" in q:
            m = q["metric"]
            line += (f"; dev {m['name']} ({m['posts']} posts) {m['reference']:.4f} → {m['exported']:.4f} "
                     f"({m['delta']:+.4f})")
        print(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--posts", type=int, default=256, help="posts per measurement")
    p.add_argument("--posts-batch1", type=int, default=64, help="posts at batch size 1 and for the latency")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--workers", type=int, default=1, help="image-decoding worker processes")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--no-sizes", action="store_true", help="skip the saved-model sizes")
    p.add_argument("--sections", nargs="+", default=["sizes", "torch", "onnx"], choices=["sizes", "torch", "onnx"],
                   help="what to measure (default all)")
    p.add_argument("--cm-memes-run", help="onnx: a trained INFIG-lite cm_memes run (configs/lite/cm-memes.yaml)")
    p.add_argument("--mvsa-single-run", help="onnx: a trained MVSA-Single text-only lite run "
                                             "(configs/lite/mvsa-single-text.yaml)")
    p.add_argument("--parity-posts", type=int, default=512, help="onnx: dev posts of the export's parity check")
    p.add_argument("--repeats", type=int, default=2, help="onnx: interleaved repeats (the best is reported)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--one-onnx", help=argparse.SUPPRESS)
    args = p.parse_args()
    import mmsenti  # noqa: F401  (compat shim before transformers/timm)

    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    if args.one_onnx:
        print(json.dumps(run_onnx(args.one_onnx, args)))
        return
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min), "
          f"{os.cpu_count()} CPUs")
    if "sizes" in args.sections and not args.no_sizes:
        print("\nsaved model (model/model.safetensors): before = whole state dict, after = what inference reads")
        print(f"{'config':<30} {'numbers before':>15} {'after':>12} {'MB before':>10} {'MB after':>9}")
        with tempfile.TemporaryDirectory() as tmp:
            for r in saved_sizes(Path(tmp)):
                print(f"{r['config']:<30} {r['numbers_before'] / 1e6:>14.2f}M {r['numbers_after'] / 1e6:>11.2f}M "
                      f"{r['mb_before']:>10.1f} {r['mb_after']:>9.1f}")
    common = ["--posts", str(args.posts), "--posts-batch1", str(args.posts_batch1), "--workers", str(args.workers)]
    if "onnx" in args.sections:
        onnx_results = []
        for name in ONNX_MODELS:
            cmd = [sys.executable, __file__, "--one-onnx", name, *common, "--parity-posts", str(args.parity_posts),
                   "--repeats", str(args.repeats)]
            for option in ("cm_memes_run", "mvsa_single_run"):
                if getattr(args, option):
                    cmd += [f"--{option.replace('_', '-')}", getattr(args, option)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{name}: {out.stderr[-3000:]}")
            onnx_results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print_onnx(onnx_results, args.workers)
        print(f"load after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    if "torch" not in args.sections:
        return
    results = []
    for name in args.models:
        cmd = [sys.executable, __file__, "--one", name, "--posts", str(args.posts), "--posts-batch1",
               str(args.posts_batch1), "--workers", str(args.workers), "--batch-sizes", *map(str, args.batch_sizes)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nposts: {results[0]['source']}; weights: pretrained backbones, untrained INFIG layers; "
          f"torch threads {results[0]['threads']}")
    print(f"\n{'model':<11} {'batch':>5} {'workers':>7} {'posts':>6} {'posts/s':>8}")
    for r in results:
        for row in r["rows"]:
            print(f"{r['model']:<11} {row['batch']:>5} {row['workers']:>7} {row['posts']:>6} {row['posts_per_s']:>8.1f}")
    for r in results:
        print(f"\n{r['model']} ({r['config']}): batch-1 latency p50 {r['latency_ms_p50']:.1f} ms, "
              f"p95 {r['latency_ms_p95']:.1f} ms; peak memory {r['peak_rss_mb']:.0f} MB "
              f"(largest decoding worker {r['peak_worker_rss_mb']:.0f} MB)")
        total = sum(r["stages_ms"].values())
        print(f"  where the time goes at batch 32, one process ({total:.1f} ms/post = {1000 / total:.1f} posts/s):")
        for stage, ms in r["stages_ms"].items():
            print(f"    {stage:<48} {ms:6.2f} ms/post  {100 * ms / total:5.1f} %")
    goal = next((row for row in results[0]["rows"] if row["batch"] == 32 and row["workers"] == args.workers), None)
    if goal and results[0]["model"] == "image+text":
        print(f"\ngoal: >= 50 posts/s image+text at batch 32 incl. decoding: {goal['posts_per_s']:.1f} posts/s "
              f"({'met' if goal['posts_per_s'] >= 50 else 'NOT met'})")


if __name__ == "__main__":
    main()
