"""Export: a trained model as an ONNX graph with checked parity, run by onnxruntime (optionally int8).

``mmsenti export RUN --format onnx [--out DIR] [--quantize int8]`` writes the folder, ``mmsenti export --check DIR``
recomputes its parity figures, and ``mmsenti.load_model(DIR, backend="onnx")`` / ``mmsenti predict|serve
--backend onnx`` predict with it (same preprocessing and answers as the PyTorch model). See docs/export.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExportError", "OnnxBackend", "ParityError", "check_export", "export_onnx"]


def __getattr__(name: str) -> Any:
    # Lazy: the CLI's parser imports mmsenti.export.command without torch or onnx.
    if name in ("export_onnx", "check_export"):
        from mmsenti.export import exporter

        return getattr(exporter, name)
    if name in ("ExportError", "ParityError"):
        from mmsenti.export import format

        return getattr(format, name)
    if name == "OnnxBackend":
        from mmsenti.export import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'mmsenti.export' has no attribute {name!r}")
