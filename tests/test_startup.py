"""Start-up: what `import mmsenti`, `mmsenti --help` and `mmsenti list` import, and registry discovery that never
hides a broken module. (How long start-up takes is measured by benchmarks/startup.py, not asserted here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
HEAVY = ("torch", "torchvision", "transformers", "timm", "torch._dynamo", "open_clip")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=ENV,
                          timeout=300)


def _modules_after(code: str) -> dict:
    r = _python(textwrap.dedent(code) + f"\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_and_help_import_no_torch():
    assert not any(_modules_after("import mmsenti").values())
    loaded = _modules_after("""
        from mmsenti.cli import main
        try:
            main(["--help"])
        except SystemExit:
            pass
    """)
    assert not any(loaded.values()), loaded


def test_list_imports_torch_but_no_model_library():
    loaded = _modules_after("""
        from mmsenti.cli import main
        main(["list"])
    """)
    assert loaded["torch"] and not any(v for k, v in loaded.items() if k != "torch"), loaded


def test_compat_hook_runs_the_shim_on_the_first_torchvision_import():
    """`import mmsenti` installs nothing but a finder; a later `import timm` (which imports torchvision) works on
    this torch whatever its torchvision build, and asking whether torchvision exists imports nothing."""
    r = _python("""
        import importlib.util, json, sys
        import mmsenti
        spec = importlib.util.find_spec("torchvision")
        asked = "torchvision" in sys.modules
        import timm
        m = timm.create_model("resnet18", pretrained=False, num_classes=3)
        from mmsenti import compat
        tv = sys.modules["torchvision"]
        print(json.dumps({"asked_imports": asked, "found": spec is not None, "classes": m.num_classes,
                          "real_spec": tv.__spec__.origin.endswith("torchvision/__init__.py"),
                          "stubbed": list(compat.stubbed_torchvision_ops())}))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {**out, "asked_imports": False, "found": True, "classes": 3, "real_spec": True}


def test_a_model_module_that_fails_to_import_is_an_error_every_time():
    """The registry used to mark discovery done before importing: one broken module left only the baselines."""
    r = _python("""
        import json, sys
        sys.modules["mmsenti.models.rahp"] = None  # any import error in a model module
        from mmsenti.registry import MODELS, RegistryError
        errors = []
        for _ in range(2):
            try:
                MODELS.get("infig")
            except ImportError as e:
                errors.append(("ImportError", str(e)))
            except RegistryError as e:
                errors.append(("RegistryError", str(e)))
        del sys.modules["mmsenti.models.rahp"]  # the module is fixed: discovery completes
        errors.append(("names", MODELS.names()))
        print(json.dumps(errors))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    (k1, e1), (k2, e2), (_, names) = json.loads(r.stdout.strip().splitlines()[-1])
    assert k1 == k2 == "ImportError" and "mmsenti.models.rahp" in e1 and "mmsenti.models.rahp" in e2
    assert names == ["image-only", "infig", "late-fusion", "rahp", "text-only"]


def test_mmsenti_list_with_a_broken_model_module_fails_loudly(tmp_path):
    (tmp_path / "sitecustomize.py").write_text('import sys\nsys.modules["mmsenti.models.rahp"] = None\n')
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV["PYTHONPATH"]])}
    r = subprocess.run([sys.executable, "-m", "mmsenti", "list", "models"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode != 0 and "mmsenti.models.rahp" in r.stderr and "late-fusion" not in r.stdout
