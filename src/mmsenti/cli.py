"""``mmsenti`` command line: train, evaluate, predict, explain, serve, export, list, data, features, cache,
experiment.

User errors (:class:`~mmsenti.errors.UserError`: bad config, missing file, bad data) print one line
``mmsenti: error: ...`` and exit with the error's code (2; 1 where the command ran and found a failure).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from mmsenti.errors import UsageError, UserError
from mmsenti.version import __version__

log = logging.getLogger("mmsenti")


def _default_run_dir(config: str | None) -> Path:
    stem = Path(config).stem if config else "default"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_train(args: argparse.Namespace) -> int:
    from mmsenti.config import load_config
    from mmsenti.distributed import Distributed, launch
    from mmsenti.train.lock import check_run_dir_free
    from mmsenti.train.trainer import Trainer

    if args.resume and not args.out:
        raise UsageError("--resume needs --out RUN_DIR (the run to continue)")
    overrides = list(args.set or []) + (["run.quiet=true"] if args.quiet else [])
    if args.nproc is not None:  # one machine, N processes: torchrun's launcher re-runs this command without --nproc
        if args.nproc < 1:
            raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
        if not args.resume:
            load_config(args.config, overrides)  # a bad config fails here, before any process starts
        return launch(args.nproc, _without_nproc(args.argv))
    dist = Distributed.from_env()
    ok = False
    try:
        if args.resume:  # --config/--set may change only what cannot change the training (RESUME_OVERRIDES)
            requested = load_config(args.config, overrides) if args.config else None
            trainer = Trainer.from_run_dir(args.out, dist=dist, config=requested, overrides=overrides)
            trainer.fit()
            out = trainer.run_dir
        else:
            cfg = load_config(args.config, overrides)
            # Rank 0's directory for every process (the default name holds the time).
            out = Path(dist.broadcast_object(str(args.out or cfg.run.out or _default_run_dir(args.config))))
            if (out / "checkpoints" / "last.pt").exists():
                check_run_dir_free(out)  # a live run's folder: name its holder rather than suggest --resume
                raise UsageError(f"{out} already holds a run; use --resume to continue it or choose another --out")
            if cfg.run.cv_folds and cfg.run.cv_fold is None:  # cross-validation: every fold, then the mean over folds
                from mmsenti.experiment.cv import train_folds

                train_folds(cfg, out, dist=dist)
            else:
                Trainer(cfg, out, dist=dist).fit()
        ok = True
    finally:
        dist.close(clean=ok)
    if dist.is_main:
        print(out)
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mmsenti.distributed import Distributed
    from mmsenti.metrics import format_table
    from mmsenti.train.workbench import load_workbench

    keep = Path(args.predictions or args.plots) if (args.predictions or args.plots) else None
    dist = Distributed.from_env()  # under torchrun the splits' batches are spread over the processes
    ok = False
    try:
        bench = load_workbench(args.run_dir, device=args.device, dist=dist, root=args.root)
        results = {split: bench.evaluate(split, save_predictions=keep / f"{split}.npz" if keep else None)
                   for split in args.split}
        ok = True
    finally:
        dist.close(clean=ok)
    if not dist.is_main:
        return 0
    print(format_table(results))
    if args.plots:
        from mmsenti.plots import write_evaluation_plots

        write_evaluation_plots(keep, args.split, args.plots)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from mmsenti.data.base import DataError, Sample, parse_tags, text_problem
    from mmsenti.inference import load_model
    from mmsenti.models.base import check_per_post
    from mmsenti.utils import show_progress

    predictor = load_model(args.run_dir, args.device, backend=args.backend)
    check_per_post(predictor.config.model, "used for prediction")
    if args.input:
        from mmsenti.batch_predict import predict_file

        stats = predict_file(predictor, args.input, args.output, batch_size=args.batch_size, workers=args.workers,
                             resume=args.resume, strict=args.strict, progress=show_progress(args.quiet))
        print(stats.summary(args.output), file=sys.stderr)
        return 0
    if args.text is None and args.image is None and args.tags is None and args.video is None:
        raise UsageError("give --text, --image, --tags and/or --video, or --input FILE")
    try:
        tags = parse_tags(args.tags, cell=True)
    except DataError as e:
        raise UsageError(f"--tags: {e}") from None
    fields = predictor.processor.post_fields
    if fields.get("image") == "image" and args.image is None:
        raise UsageError("this model reads images: give --image PATH")
    if fields.get("image") == "tags" and not tags:
        raise UsageError("this model reads its image as tags (model.image_encoder.name=tags): give --tags 'a|b|c'")
    if "video" in fields.values() and args.video is None:
        raise UsageError("this model reads clips (features it extracts itself): give --video PATH")
    if args.video is not None and not Path(args.video).is_file():
        raise UsageError(f"--video {args.video}: no such file")
    if "text" in fields and args.text is None:
        raise UsageError("this model reads text: give --text T")
    if args.text is not None and (problem := text_problem(args.text)) is not None:  # argv bytes that are not UTF-8
        raise UsageError(f"--text {problem}: is the shell's encoding UTF-8?")
    prediction = predictor.predict_samples([Sample(id="cli", label=None, text=args.text, image=args.image,
                                                   tags=tags, video=args.video)])[0]
    print(json.dumps(prediction.to_dict(), ensure_ascii=False, indent=2))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from mmsenti.registry import DATASETS, EXTRACTORS, MODELS

    kinds = {"models": MODELS, "datasets": DATASETS, "extractors": EXTRACTORS}
    for kind in [args.kind] if args.kind else list(kinds):
        registry = kinds[kind]
        if args.markdown:  # the docs tables are generated from the registries with this
            if registry.variants():
                print(f"| {kind[:-1]} | description | variants |\n|---|---|---|")
                print("\n".join(f"| `{e.name}` | {e.description} | "
                                f"{', '.join(f'`{v.name}`' for v in registry.variants(e.name))} |" for e in registry))
            else:
                print(f"| {kind[:-1]} | description |\n|---|---|")
                print("\n".join(f"| `{e.name}` | {e.description} |" for e in registry))
            print()
            continue
        print(f"{kind}:")
        for entry in registry:  # each entry, then its variants (infig-tiny under infig)
            for name, description in [(entry.name, entry.description),
                                      *((v.name, v.description) for v in registry.variants(entry.name))]:
                print(f"  {name:<16} {description}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from mmsenti.config import load_config
    from mmsenti.data import doctor

    overrides = [f"data.name={args.name}"] + ([f"data.root={args.root}"] if args.root else []) + list(args.set or [])
    cfg = load_config(None, overrides)
    if args.action == "convert":
        from mmsenti.data.formats.mmsa import MMSAConfig, convert_dataset

        if not isinstance(cfg.data, MMSAConfig):
            raise UsageError(f"data convert: dataset '{args.name}' has no pickle format to convert (mosi, mosei)")
        for path in convert_dataset(cfg.data):
            print(path)
        return 0
    report = doctor.check(cfg.data, decode_images=args.decode) if args.action == "check" else doctor.stats(cfg.data)
    print(doctor.format_report(report))
    return 1 if args.action == "check" and getattr(report, "has_errors", False) else 0


def cmd_features(args: argparse.Namespace) -> int:
    import yaml

    from mmsenti.config import ConfigError, merge, parse_override
    from mmsenti.data.video.extraction import ExtractionConfig
    from mmsenti.data.video.job import extract_features
    from mmsenti.utils import show_progress

    data: dict = {}
    if args.config:
        try:
            data = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{args.config}: cannot read the extraction settings ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{args.config}: expected a mapping of extraction settings")
    for item in args.set or []:
        data = merge(data, parse_override(item))
    config = ExtractionConfig.from_mapping(data)
    summary = extract_features(args.input, args.out, config, workers=args.workers, strict=args.strict,
                               progress=show_progress(args.quiet))
    print(summary.line(Path(args.out)), file=sys.stderr)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from mmsenti.train.cache import clear_entries, default_cache_dir, list_entries

    if args.action == "build":
        from mmsenti.config import load_config
        from mmsenti.distributed import Distributed
        from mmsenti.train.workbench import build_workbench

        if not args.config:
            raise UsageError("cache build needs --config (the training config whose frozen features to cache)")
        cfg = load_config(args.config, list(args.set or []) + ([f"run.cache_dir={args.dir}"] if args.dir else []))
        dist = Distributed.from_env()
        ok = False
        try:
            # The training run's build path: randomly initialised frozen parts match the training run's.
            bench = build_workbench(cfg, dist=dist, feature_cache=True)
            if not bench.model.cache_spec():
                raise UsageError(f"{args.config}: nothing to cache (no frozen image backbone and "
                                 "model.text_encoder.trainable_layers = -1)")
            for split in args.split or list(bench.bundle.splits):
                store = bench.feature_store(split)
                if dist.is_main:
                    print(f"{split}: {len(store)} samples → {store.directory}")
            ok = True
        finally:
            dist.close(clean=ok)
        return 0
    root = default_cache_dir(args.dir)
    if args.action == "info":
        rows = list_entries(root)
        print(f"{root}: {len(rows)} entries, {sum(r['size_mb'] for r in rows):.1f} MB")
        for r in rows:
            print(f"  {r['key'][:16]}  {r.get('dataset') or '?':<14} {r.get('split') or '?':<6} "
                  f"{r.get('num_samples') or 0:>7} samples {r['size_mb']:9.1f} MB  {r['status']}  [{r.get('features', '')}]")
        return 0
    if not args.keys and not args.all:
        raise UsageError("cache clear needs entry keys (see `mmsenti cache info`) or --all")
    print(f"removed {clear_entries(root, [] if args.all else args.keys)} entries from {root}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from mmsenti.explain.command import run
    from mmsenti.inference import load_model

    return run(args, load_model)


def cmd_experiment(args: argparse.Namespace) -> int:
    from mmsenti.experiment.commands import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    # Imports nothing heavy: `mmsenti --help` must not import torch (names are checked when a command runs).
    p = argparse.ArgumentParser(prog="mmsenti", description="Multimodal sentiment analysis.")
    p.add_argument("--version", action="version", version=f"mmsenti {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a config")
    t.add_argument("--config", help="YAML config (only its differences from the defaults)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set optim.lr=3e-4")
    t.add_argument("--out", help="run directory (default runs/<config>-<time>)")
    t.add_argument("--resume", action="store_true",
                   help="continue the killed run in --out (--set/--config may change only data.root, "
                        "data.missing_images, data.num_workers and how the run reports: run.threads, run.quiet, ...)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("--nproc", type=int, metavar="N",
                   help="train with N processes on this machine (torchrun's launcher; one GPU each on CUDA)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="score a trained model on a split")
    e.add_argument("run_dir")
    e.add_argument("--split", nargs="+", default=["test"], choices=["train", "dev", "test"])
    e.add_argument("--root", help="dataset directory, if it moved since training")
    e.add_argument("--output", help="also write the metrics as JSON here")
    e.add_argument("--device", default="auto")
    e.add_argument("--predictions", metavar="DIR", help="also write per-post predictions (DIR/<split>.npz)")
    e.add_argument("--plots", metavar="DIR", help="also write a confusion matrix and a reliability diagram (PNG)")
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="predict with a trained model")
    pr.add_argument("run_dir")
    pr.add_argument("--text")
    pr.add_argument("--image")
    pr.add_argument("--tags", help="the post's tags, separated by | (a model whose image encoder is tags)")
    pr.add_argument("--video", help="a clip (a model trained on `mmsenti features extract` output extracts it with "
                                    "its own settings)")
    pr.add_argument("--input", help="a .jsonl or .csv file with text/image (or tags) columns (image paths relative "
                                    "to it)")
    pr.add_argument("--output", help="predictions as JSON lines, written as they come (default: stdout)")
    pr.add_argument("--batch-size", type=int, default=32, help="posts per model call (default 32)")
    pr.add_argument("--workers", type=int, default=0, help="processes decoding images (default 0: this one)")
    pr.add_argument("--resume", action="store_true", help="continue an interrupted --output file")
    pr.add_argument("--strict", action="store_true",
                    help="stop at the first bad row (default: write it with an \"error\" field and go on)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                    help="onnx: run the model's ONNX export (RUN_DIR = the export folder, or a run holding RUN/onnx) "
                         "with onnxruntime")
    pr.set_defaults(func=cmd_predict)

    from mmsenti.explain.command import add_explain_parser

    add_explain_parser(sub).set_defaults(func=cmd_explain)

    from mmsenti.serve.command import add_serve_parser

    add_serve_parser(sub)

    from mmsenti.export.command import add_export_parser

    add_export_parser(sub)

    li = sub.add_parser("list", help="list registered models, datasets and clip feature extractors")
    li.add_argument("kind", nargs="?", choices=["models", "datasets", "extractors"])
    li.add_argument("--markdown", action="store_true", help="as Markdown tables (for the docs)")
    li.set_defaults(func=cmd_list)

    d = sub.add_parser("data", help="check, describe or convert a dataset")
    d.add_argument("action", choices=["check", "stats", "convert"],
                   help="check: problems (exit 1 if any); stats: distributions; convert: MMSA pickles → safe .npz")
    d.add_argument("name", help="a registered dataset (`mmsenti list datasets`)")
    d.add_argument("--root", help="dataset directory")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="data option, e.g. --set data.format=raw")
    d.add_argument("--decode", action="store_true", help="check: decode every image fully (slower, thorough)")
    d.set_defaults(func=cmd_data)

    f = sub.add_parser("features", help="extract audio/vision features from your own clips (a features dataset)")
    fsub = f.add_subparsers(dest="action", required=True)
    fx = fsub.add_parser("extract", help="clips → features.npz + manifest (resumes; bad clips listed, not fatal)")
    fx.add_argument("input", help="a folder in the MMSA raw layout (label.csv + Raw/<video>/<clip>.mp4), or a "
                                  ".jsonl/.csv with video, text, label (and split) per clip")
    fx.add_argument("--out", required=True, help="output folder (then: data.name=features, data.root=OUT)")
    fx.add_argument("--config", help="extraction settings (YAML: audio, vision, max_seconds, min_seconds)")
    fx.add_argument("--set", action="append", metavar="KEY=VALUE", help="a setting, e.g. --set vision.fps=10")
    fx.add_argument("--workers", type=int, default=2, help="processes extracting clips (default 2)")
    fx.add_argument("--strict", action="store_true", help="stop at the first bad clip (default: list it and go on)")
    fx.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_features)

    c = sub.add_parser("cache", help="build, inspect or clear the frozen-feature cache")
    c.add_argument("action", choices=["build", "info", "clear"])
    c.add_argument("keys", nargs="*", help="clear: entry keys (or prefixes) to remove")
    c.add_argument("--config", help="build: the training config")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="build: config override")
    c.add_argument("--split", action="append", help="build: only these splits (default all)")
    c.add_argument("--dir", help="cache directory (default run.cache_dir, $MMSENTI_CACHE_DIR, ~/.cache/mmsenti/features)")
    c.add_argument("--all", action="store_true", help="clear: remove every entry")
    c.set_defaults(func=cmd_cache)

    from mmsenti.experiment.commands import add_parser as add_experiment_parser

    add_experiment_parser(sub).set_defaults(func=cmd_experiment)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)  # before any heavy import: --help and usage errors exit here
    args.argv = argv  # `train --nproc N` re-runs this command line in N processes

    from mmsenti.utils import setup_logging

    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except UserError as e:  # the one place a user's error becomes a line and an exit code
        print(f"mmsenti: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mmsenti: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
