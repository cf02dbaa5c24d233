"""mmsenti.compat: torchvision / timm / open_clip import on a torch whose torchvision ops may not load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmsenti import compat

SRC = Path(__file__).resolve().parents[1] / "src"


def _require(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


def _run(code: str, prelude: str = "") -> dict:
    """Run ``code`` in a fresh interpreter (import state is per process) and return the JSON it prints last."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _naive_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> list[int]:
    keep: list[int] = []
    for i in scores.argsort(descending=True).tolist():
        ok = True
        for j in keep:
            lt = torch.maximum(boxes[i, :2], boxes[j, :2])
            rb = torch.minimum(boxes[i, 2:], boxes[j, 2:])
            inter = (rb - lt).clamp(min=0).prod()
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            if inter / (area(boxes[i]) + area(boxes[j]) - inter) > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def test_imports_and_timm_model_creation():
    _require("timm")
    tv = compat.import_torchvision()
    assert hasattr(tv, "models") and hasattr(tv.models, "mobilenet_v2")
    timm = compat.import_timm()
    model = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
        assert model.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)
    # Pure-Python torchvision models work whatever the state of the compiled ops.
    assert tv.models.mobilenet_v2(weights=None).classifier[1].out_features == 1000
    assert compat.import_torchvision() is tv  # idempotent


def test_open_clip_imports():
    _require("open_clip")
    open_clip = compat.import_open_clip()
    assert "ViT-B-32" in open_clip.list_models()


def test_compiled_op_without_kernel_fails_clearly_or_works():
    _require("torchvision")
    tv = compat.import_torchvision()
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    if compat.torchvision_ops_available():
        assert compat.stubbed_torchvision_ops() == ()  # the shim did nothing
        assert tv.ops.nms(boxes, scores, 0.5).tolist() == _naive_nms(boxes, scores, 0.5)
        return
    assert set(compat.stubbed_torchvision_ops()) <= {"nms", "qnms"} and "nms" in compat.stubbed_torchvision_ops()
    with pytest.raises(compat.TorchvisionOpsUnavailable, match=r"torchvision::nms has no kernel.*compiled ops"):
        torch.ops.torchvision.nms(boxes, scores, 0.5)
    with pytest.raises(RuntimeError):  # torchvision's own wrapper checks first, with its own message
        tv.ops.nms(boxes, scores, 0.5)


def test_fresh_process_plain_import_fails_but_shim_succeeds():
    """In a fresh interpreter: the raw import either works (matching build: the shim must then be a no-op) or
    fails with the known error, and after import_torchvision() a plain `import timm` works too."""
    _require("timm")
    out = _run("""
        import json
        raw_error = None
        try:
            import torchvision  # noqa: F401
        except RuntimeError as e:
            raw_error = str(e)
        from mmsenti import compat
        compat.import_torchvision()
        import timm
        m = timm.create_model("efficientnet_lite0", pretrained=False)
        print(json.dumps({"raw_error": raw_error, "stubbed": list(compat.stubbed_torchvision_ops()),
                          "features": m.num_features}))
    """)
    assert out["features"] == 1280
    if out["raw_error"] is None:
        assert out["stubbed"] == []  # no-op when torchvision's ops are fine
    else:
        assert "torchvision::" in out["raw_error"] and "does not exist" in out["raw_error"]
        assert "nms" in out["stubbed"]


def test_shim_is_noop_on_clean_import_and_reports_unknown_ops():
    """Simulated import outcomes: a clean import defines nothing; an unknown missing op is a clear ImportError;
    an unrelated RuntimeError propagates unchanged."""
    out = _run(prelude=f"COMPAT_PATH = {str(SRC / 'mmsenti' / 'compat.py')!r}\n", code="""
        import importlib, importlib.util, json, sys, types
        # Load compat.py on its own: `import mmsenti` already runs the shim on the real torchvision.
        spec = importlib.util.spec_from_file_location("compat_under_test", COMPAT_PATH)
        compat = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(compat)
        real = importlib.import_module
        fake = types.ModuleType("torchvision")
        behaviour = {"mode": "ok"}
        def fake_import(name, package=None):
            if name != "torchvision":
                return real(name, package)
            if behaviour["mode"] == "ok":
                return fake
            if behaviour["mode"] == "unknown":
                raise RuntimeError("operator torchvision::frobnicate does not exist")
            raise RuntimeError("something else entirely")
        importlib.import_module = fake_import
        res = {"clean_is_fake": compat.import_torchvision() is fake, "stubbed": list(compat.stubbed_torchvision_ops())}
        behaviour["mode"] = "unknown"
        try:
            compat.import_torchvision()
        except ImportError as e:
            res["unknown"] = str(e)
        behaviour["mode"] = "other"
        try:
            compat.import_torchvision()
        except RuntimeError as e:
            res["other"] = str(e)
        print(json.dumps(res))
    """)
    assert out["clean_is_fake"] and out["stubbed"] == []
    assert "torchvision::frobnicate" in out["unknown"]
    assert out["other"] == "something else entirely"
