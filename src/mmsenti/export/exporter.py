"""``mmsenti export RUN --format onnx``: the inference model as an ONNX graph, checked against PyTorch.

The graph is written by ``torch.onnx.export(..., dynamo=True)``: ``torch.export`` captures the model with symbolic
batch and sequence sizes and onnxscript translates it. The TorchScript exporter (``dynamo=False``) is not used: it
traces with the example's sizes, and ``nn.MultiheadAttention`` (our transformer blocks) then bakes the example's
sequence length into a ``Reshape``, so the graph fails (INFIG) at any other length although its inputs are declared
dynamic. The dynamo exporter keeps those sizes symbolic and gives the same logits to ~1e-7 (HF BERT/MiniLM, timm
CNNs, nn.MultiheadAttention and ``scaled_dot_product_attention``).

An export folder (written around the graph by :meth:`~mmsenti.models.folder.ModelFolder.write_export`)::

    model.onnx            the graph (fp32, or int8 with --quantize int8)
    export.json           mmsenti version, opset, inputs/outputs (names, dtypes, shapes), parity figures
    config.json, labels.json, preprocessing.json, tokenizer/    the model folder's preprocessing, unchanged
    metrics.json          the run's metrics (shown by `mmsenti serve`), when the run has them
    manifest.json         size + SHA-256 of every file, verified when the folder is loaded
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from mmsenti.export.format import DEFAULT_OPSET, ExportError, ParityError, TensorSpec
from mmsenti.export.graph import GraphModule, graph_mode, input_specs, output_specs
from mmsenti.export.parity import (
    ParityInputs,
    build_inputs,
    compare,
    describe,
    generated_batches,
    onnx_outputs,
    passes,
    torch_outputs,
)
from mmsenti.export.runtime import OnnxBackend, require_onnxruntime
from mmsenti.models.folder import EXPORT_FILE, EXPORT_SUBDIR, ONNX_FILE, ModelFolder

log = logging.getLogger(__name__)

MIN_OPSET = 18  # the opset its translation library is written in; older ones go through the version converter
TOLERANCE = 1e-4  # fp32 parity: max |Δlogit|
QUANT_OPS = ["MatMul", "Gemm"]  # dynamic int8: the weights of linear layers
EXTERNAL_DATA_BYTES = 1.5 * 2**30  # protobuf's 2 GB limit: larger graphs keep their weights in model.onnx.data


def export_onnx(source: str | Path, out: str | Path | None = None, *, opset: int = DEFAULT_OPSET,
                quantize: str | None = None, parity: bool = True, parity_posts: int = 512, batch_size: int = 16,
                tolerance: float = TOLERANCE, root: str | None = None, seed: int = 0,
                threads: int | None = None) -> tuple[Path, dict[str, Any]]:
    """Export a trained model (run or model folder) to an ONNX folder; returns ``(folder, export.json)``.

    Args:
        out: the folder to write (default ``RUN/onnx``, ``RUN/onnx-int8`` with ``quantize``); an earlier export
            there is replaced, any other non-empty folder is refused.
        opset: ONNX opset of the graph.
        quantize: ``"int8"``: onnxruntime dynamic quantisation of the linear layers' weights (activations quantised
            per batch at run time). Its agreement and dev-metric change are reported, never a reason to fail.
        parity: run the PyTorch model and onnxruntime on the same inputs (the dev split when it loads, plus
            generated shape probes) and fail when fp32 logits differ by more than ``tolerance`` or a prediction
            differs.
        parity_posts: at most this many dev posts, in batches of ``batch_size``.
        root: the dataset directory, if it moved since training.
        seed: of the generated inputs.
        threads: onnxruntime intra-op threads for the parity run.
    """
    from mmsenti.version import __version__

    if quantize not in (None, "int8"):
        raise ExportError(f"--quantize: only int8 is supported, got {quantize!r}")
    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset}: the exporter writes opset {MIN_OPSET} or newer")
    require_onnxruntime()
    if (Path(source) / EXPORT_FILE).is_file():
        raise ExportError(f"{source}: is an export already; export the run or model folder it came from")
    folder = ModelFolder.open(source)
    model_dir, processor, cfg = folder.directory, folder.processor, folder.config
    out = Path(out) if out is not None else folder.run_dir / (EXPORT_SUBDIR + (f"-{quantize}" if quantize else ""))
    _check_out(out, model_dir)
    model = folder.load_model("cpu")
    model.export_check()
    inputs, outputs = input_specs(model, processor), output_specs(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        graph = tmp / ONNX_FILE
        t0 = time.perf_counter()
        log.info("exporting %s (%s) to ONNX opset %d ...", model_dir, cfg.model.name, opset)
        torch_export(model, processor, inputs, outputs, graph, opset)
        log.info("exported in %.1fs (%.1f MB)", time.perf_counter() - t0, graph.stat().st_size / 2**20)
        report: dict[str, Any] | None = None
        if parity:
            data = build_inputs(model, processor, cfg, inputs, posts=parity_posts, batch_size=batch_size, seed=seed,
                                root=root)
            log.info("parity inputs: %s", data.description)
            check = Parity(model, cfg, data, threads)
            fp32 = check.figures(graph)
            log.info("parity fp32: %s", describe(fp32))
            if not passes(fp32, tolerance):
                raise ParityError(f"the exported graph does not answer as the PyTorch model: {describe(fp32)} "
                                  f"(needs max |Δlogit| <= {tolerance:g} and 100 % agreement); nothing written")
            report = {"inputs": data.description, "recipe": data.recipe, "tolerance": tolerance, "fp32": fp32}
            if data.warnings:
                report["warnings"] = data.warnings
        quantization = None
        if quantize:
            quantization = quantize_int8(graph, tmp / "model.int8.onnx")
            (tmp / "model.int8.onnx").replace(graph)  # one file: int8 weights fit where the fp32 ones did not
            (tmp / (ONNX_FILE + ".data")).unlink(missing_ok=True)
            if report is not None:
                report["int8"] = check.figures(graph)
                log.info("parity int8: %s", describe(report["int8"]))
        meta = {
            "format": "onnx", "mmsenti_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": {"name": folder.name, "model_dir": str(model_dir.resolve()), "model": cfg.model.name,
                       "dataset": cfg.data.name, "weights_sha256": folder.sha256},
            "exporter": "torch.onnx.export(dynamo=True)", "versions": _versions(), "opset": opset,
            "precision": quantize or "fp32", "quantization": quantization,
            "task": model.info.task, "labels": model.info.label_names,
            "inputs": [s.to_dict() for s in inputs], "outputs": [s.to_dict() for s in outputs],
            "supports_missing_modality": bool(getattr(model, "supports_missing_modality", False)),
            "retrieval": None, **model.export_info(), "parity": report,
        }
        folder.write_export(tmp, meta)
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out, meta


class Parity:
    """The PyTorch model's answers on the parity inputs (computed once), and a graph's figures against them."""

    def __init__(self, model, cfg, data: ParityInputs, threads: int | None = None):
        from mmsenti.train.workbench import select_metric

        self.model, self.data, self.threads = model, data, threads
        self.reference, self.extras = torch_outputs(model, data)
        self.metric = select_metric(cfg, model.info.task) if data.labels is not None else None

    def figures(self, graph: Path) -> dict[str, Any]:
        """:func:`~mmsenti.export.parity.compare` of the graph at ``graph`` (run by onnxruntime) with the model."""
        logits, extras = onnx_outputs(OnnxBackend(graph, self.threads), self.data)
        return compare(self.model.info.task, self.reference, logits, labels=self.data.labels, metric=self.metric,
                       label_names=self.model.info.label_names, extras_ref=self.extras, extras_exported=extras)


def _check_out(out: Path, model_dir: Path) -> None:
    if out.resolve() == model_dir.resolve():
        raise ExportError(f"--out {out}: that is the model folder itself; choose another folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / EXPORT_FILE).is_file())):
        raise ExportError(f"--out {out}: exists and is not an earlier export (no {EXPORT_FILE}); choose another "
                          "folder")


def torch_export(model, processor, inputs: list[TensorSpec], outputs: list[TensorSpec], path: Path,
                 opset: int = DEFAULT_OPSET) -> None:
    """Write ``model`` as an ONNX graph with dynamic batch and sequence axes (see the module docstring)."""
    import onnx
    from torch.export import Dim

    module = GraphModule(model, inputs)
    example = generated_batches(model, processor, inputs, seed=1, shapes=((3, 7),))[0]
    limits = {axis: n for b in processor.active(training=False) for axis, n in b.axis_limits().items()}
    dims: dict[str, Any] = {}

    def dim(name: str):
        if name not in dims:  # e.g. token sequences never exceed the tokenizer's maximum length
            dims[name] = Dim(name, max=limits[name]) if name in limits else Dim(name)
        return dims[name]

    shapes = (tuple({i: dim(a) for i, a in enumerate(s.shape) if isinstance(a, str)} for s in inputs),)
    big = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > EXTERNAL_DATA_BYTES
    try:
        with graph_mode(module), torch.no_grad(), _quiet():
            torch.onnx.export(module, tuple(example[s.name] for s in inputs), str(path), dynamo=True,
                              input_names=[s.name for s in inputs], output_names=[s.name for s in outputs],
                              opset_version=opset, dynamic_shapes=shapes, external_data=big, verbose=False)
    except Exception as e:  # noqa: BLE001 - the exporter raises many kinds; the user gets one line, -v the rest
        log.debug("torch.onnx.export failed", exc_info=True)
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ExportError(f"torch.onnx.export failed for model '{model.config.name}': {first[:300]} "
                          "(run with -v for the trace)") from None
    graph = onnx.load(str(path), load_external_data=False)
    for spec, value in zip(inputs, graph.graph.input, strict=True):
        for i, axis in enumerate(spec.shape):
            d = value.type.tensor_type.shape.dim[i]
            if isinstance(axis, str) and not d.dim_param:
                raise ExportError(f"the exporter fixed axis {i} ({axis}) of input '{spec.name}' to {d.dim_value}: "
                                  "the model specialises on that size; it cannot be exported with dynamic axes")


def quantize_int8(src: Path, dst: Path) -> dict[str, Any]:
    """onnxruntime dynamic quantisation: int8 weights (one scale per output channel) of MatMul/Gemm with constant
    weights, uint8 activations quantised per batch at run time; convolutions, attention score products and
    everything else stay fp32. (Per channel: a third of the logit error of per tensor at the same speed on
    INFIG-lite; ConvInteger was 4x slower than fp32 convolutions here.)"""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=QUANT_OPS,
                         per_channel=True, extra_options={"MatMulConstBOnly": True})
    return {"method": "onnxruntime.quantization.quantize_dynamic", "weights": "int8 per output channel",
            "activations": "uint8, scale computed per batch", "op_types": QUANT_OPS}


@contextlib.contextmanager
def _quiet():
    """The exporter's and quantiser's chatter (prints, warnings, INFO logs of every graph pass) stays out of the
    user's terminal; failures still raise."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "root")]
    levels = [lg.level for lg in loggers]
    handlers = logging.root.handlers[:]  # the quantiser calls logging.basicConfig: every line would print twice
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        logging.root.handlers[:] = handlers


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    out = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    with contextlib.suppress(ImportError):
        import onnxscript

        out["onnxscript"] = onnxscript.__version__
    return out


# --------------------------------------------------------------------------------------------------------- check
def check_export(directory: str | Path, source: str | Path | None = None, root: str | None = None,
                 threads: int | None = None) -> tuple[list[str], list[str]]:
    """Recompute the parity figures of an export folder; returns ``(report lines, mismatches)``.

    Args:
        source: the model it was exported from (default: the folder recorded in ``export.json``).
        root: the dataset directory, if it moved.
    """
    from mmsenti.data.base import DataError
    from mmsenti.export.parity import mismatches

    export = ModelFolder.open(directory, "onnx")
    folder, meta = export.directory, export.export
    report = meta.get("parity")
    if not report:
        raise ExportError(f"{folder}: exported with --no-parity: there are no figures to check")
    src = Path(source) if source else Path(meta["source"]["model_dir"])
    try:
        model_dir = ModelFolder.find(src)
    except DataError as e:
        raise ExportError(f"the model it was exported from is not available ({e}); give it with --run") from None
    source_folder = ModelFolder.open(model_dir)
    if source_folder.sha256 != meta["source"]["weights_sha256"]:
        raise ExportError(f"{model_dir}: its weights are not those {folder} was exported from (SHA-256 differs)")
    model, processor, cfg = source_folder.load_model("cpu"), source_folder.processor, source_folder.config
    inputs = [TensorSpec(**s) for s in meta["inputs"]]
    recipe = report["recipe"]
    dev = recipe.get("dev")
    data = build_inputs(model, processor, cfg, inputs, posts=dev["posts"] if dev else 0,
                        batch_size=dev["batch_size"] if dev else 16, seed=recipe["generated"]["seed"], root=root,
                        use_dev=dev is not None, require_dev=dev is not None)
    figures = Parity(model, cfg, data, threads).figures(export.weights)
    key = meta["precision"]
    lines = [f"{folder}: {meta['precision']} graph of {model_dir} ({meta['source']['model']})",
             f"inputs: {data.description}",
             f"recorded   {key}: {describe(report[key])}", f"recomputed {key}: {describe(figures)}"]
    bad = mismatches(report[key], figures, f"{key}.")
    if data.recipe != recipe:
        bad.append(f"inputs: recorded {recipe}, rebuilt {data.recipe}")
    if key == "fp32" and not passes(figures, report["tolerance"]):
        bad.append(f"fp32 parity no longer holds (tolerance {report['tolerance']:g})")
    if key == "int8":
        lines.append("(the fp32 figures were measured on the graph before quantisation, which is not kept)")
    return lines, bad
