"""``mmsenti serve RUN_DIR``: the command line of the service (its parser imports no FastAPI)."""

from __future__ import annotations

import argparse
import logging

from mmsenti.serve.settings import ServeSettings

log = logging.getLogger(__name__)


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve a trained model: REST API + web page",
                       description="Serve a trained model (a run or model directory) with a REST API (/v1/predict, "
                                   "/v1/model, /healthz, /readyz, OpenAPI docs at /docs) and a web page at /.")
    s.add_argument("run_dir")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    ServeSettings.add_arguments(s)
    s.add_argument("--device", default="auto")
    s.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="onnx: serve the model's ONNX export (RUN_DIR = the export folder, or a run holding RUN/onnx) "
                        "with onnxruntime")
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from mmsenti.data.base import DataError

    try:
        settings = ServeSettings.from_args(args)
    except ValueError as e:
        raise DataError(str(e)) from None
    try:
        import uvicorn

        from mmsenti.serve.app import create_app
    except ImportError as e:
        raise DataError(f"mmsenti serve needs FastAPI and uvicorn ({e}): pip install 'mmsenti[serve]'") from None
    from mmsenti.inference import load_model
    from mmsenti.models.base import check_per_post

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
