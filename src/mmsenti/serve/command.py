"""``mmsenti serve RUN_DIR``: the command line of the service (its parser imports no FastAPI)."""

from __future__ import annotations

import argparse
import logging

from mmsenti.serve.settings import API_KEY_ENV, ServeSettings

log = logging.getLogger(__name__)


def add_serve_parser(sub) -> None:
    d = ServeSettings(api_key=None)
    s = sub.add_parser("serve", help="serve a trained model: REST API + web page",
                       description="Serve a trained model (a run or model directory) with a REST API (/v1/predict, "
                                   "/v1/model, /healthz, /readyz, OpenAPI docs at /docs) and a web page at /.")
    s.add_argument("run_dir")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help=f"require this key on every /v1 route (default: ${API_KEY_ENV} if set)")
    s.add_argument("--allow-missing-modality", action="store_true",
                   help="accept posts without one of the model's modalities (models trained with modality dropout)")
    s.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="posts per model call")
    s.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="how long an idle model waits for more posts to batch")
    s.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20)
    s.add_argument("--max-image-mb", type=float, default=d.max_image_bytes / 2**20)
    s.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    s.add_argument("--max-image-aspect", type=float, default=d.max_image_aspect,
                   help="longest side / shortest side of an image")
    s.add_argument("--min-image-side", type=int, default=d.min_image_side, help="pixels")
    s.add_argument("--max-text-chars", type=int, default=d.max_text_chars)
    s.add_argument("--max-posts", type=int, default=d.max_posts, help="posts per request")
    s.add_argument("--image-formats", default=",".join(d.image_formats), help="accepted image formats (PIL names)")
    s.add_argument("--model-name", help="name shown in answers (default: the run directory's name)")
    s.add_argument("--device", default="auto")
    s.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="onnx: serve the model's ONNX export (RUN_DIR = the export folder, or a run holding RUN/onnx) "
                        "with onnxruntime")
    s.set_defaults(func=cmd_serve)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    kwargs = dict(
        max_body_bytes=int(args.max_body_mb * 2**20), max_image_bytes=int(args.max_image_mb * 2**20),
        max_image_pixels=args.max_image_pixels, max_image_aspect=args.max_image_aspect,
        min_image_side=args.min_image_side, max_text_chars=args.max_text_chars, max_posts=args.max_posts,
        image_formats=tuple(f.strip() for f in args.image_formats.split(",") if f.strip()),
        allow_missing_modality=args.allow_missing_modality, max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms, model_name=args.model_name)
    if args.api_key:
        kwargs["api_key"] = args.api_key
    return ServeSettings(**kwargs)


def cmd_serve(args: argparse.Namespace) -> int:
    from mmsenti.data.base import DataError

    try:
        settings = settings_from_args(args)
    except ValueError as e:
        raise DataError(str(e)) from None
    try:
        import uvicorn

        from mmsenti.serve.app import create_app
    except ImportError as e:
        raise DataError(f"mmsenti serve needs FastAPI and uvicorn ({e}): pip install 'mmsenti[serve]'") from None
    from mmsenti.inference import check_per_post, load_model

    # Before listening: a bad model directory, or one that cannot be served, is a clear error.
    predictor = load_model(args.run_dir, args.device, backend=args.backend)
    check_per_post(predictor.config.model, "served")
    if settings.allow_missing_modality:
        try:
            predictor.allow_missing()
        except ValueError as e:
            raise DataError(f"--allow-missing-modality: {e}") from None
    app = create_app(args.run_dir, settings, predictor=predictor)
    log.info("listening on http://%s:%d (web page at /, API docs at /docs)%s", args.host, args.port,
             "; API key required" if settings.api_key else "")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
