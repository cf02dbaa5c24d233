"""``mmsenti export``: the command line (its parser imports neither torch nor onnx)."""

from __future__ import annotations

import argparse

from mmsenti.errors import ExportError, ParityError
from mmsenti.export.format import DEFAULT_OPSET, TensorSpec

# Names models.folder.EXPORT_SUBDIR without importing it (mmsenti.models imports torch); tests/test_export.py checks.
OUT_HELP = ("the export folder (default RUN_DIR/onnx, RUN_DIR/onnx-int8 with --quantize int8); an earlier export is "
            "replaced")


def add_export_parser(sub) -> None:
    e = sub.add_parser(
        "export", help="export a trained model to ONNX with checked parity (or --check an export)",
        description="Export a trained model (run or model folder) as an ONNX graph with dynamic batch and sequence "
                    "axes, its preprocessing files and export.json. The PyTorch model and onnxruntime are run on the "
                    "same inputs (the dev split when its data loads, plus generated shape probes); the export fails "
                    "when an fp32 logit differs by more than --tolerance or a prediction differs. --check DIR "
                    "recomputes an export's figures.")
    e.add_argument("run_dir", nargs="?", help="the trained model: a run folder or a model folder")
    e.add_argument("--format", choices=["onnx"], default="onnx", help="the export format (default onnx)")
    e.add_argument("--out", help=OUT_HELP)
    e.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    e.add_argument("--quantize", choices=["int8"],
                   help="int8 weights for CPU (onnxruntime dynamic quantisation); agreement and the dev-metric "
                        "change are reported in export.json")
    e.add_argument("--no-parity", action="store_true", help="skip the parity check (export.json then has no figures)")
    e.add_argument("--parity-posts", type=int, default=512, help="dev posts the parity check runs (default 512)")
    e.add_argument("--batch-size", type=int, default=16, help="posts per batch in the parity check (default 16)")
    e.add_argument("--tolerance", type=float, default=1e-4, help="largest fp32 |Δlogit| accepted (default 1e-4)")
    e.add_argument("--root", help="the dataset directory, if it moved since training (for the dev split)")
    e.add_argument("--check", metavar="EXPORT_DIR", help="recompute the parity figures of an export and compare")
    e.add_argument("--run", metavar="RUN_DIR", help="--check: the model it was exported from, if it moved")
    e.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from mmsenti.export.exporter import check_export, export_onnx
    from mmsenti.export.parity import describe

    if args.check:
        if args.run_dir:
            raise ExportError("give either RUN_DIR (to export) or --check EXPORT_DIR, not both")
        lines, bad = check_export(args.check, args.run, args.root)
        print("\n".join(lines))
        if bad:
            raise ParityError(f"{args.check}: {len(bad)} figure(s) of export.json not reproduced: " + "; ".join(bad))
        print("check passed: the recorded figures are reproduced")
        return 0
    if not args.run_dir:
        raise ExportError("give the RUN_DIR to export, or --check EXPORT_DIR")
    if args.parity_posts < 1 or args.batch_size < 1 or args.tolerance < 0:
        raise ExportError("--parity-posts and --batch-size must be >= 1 and --tolerance >= 0")
    out, meta = export_onnx(args.run_dir, args.out, opset=args.opset, quantize=args.quantize,
                            parity=not args.no_parity, parity_posts=args.parity_posts, batch_size=args.batch_size,
                            tolerance=args.tolerance, root=args.root)  # a failed parity check: ParityError, exit 1
    print(out)
    size = sum(meta["files"].values()) / 2**20
    print(f"  {meta['precision']} graph, opset {meta['opset']}, {size:.1f} MB; inputs: "
          + ", ".join(str(TensorSpec(**s)) for s in meta["inputs"]))
    parity = meta["parity"]
    if parity is None:
        print("  parity not checked (--no-parity)")
        return 0
    print(f"  parity inputs: {parity['inputs']}")
    for warning in parity.get("warnings", []):
        print(f"  warning: {warning}")
    for key in ("fp32", "int8"):
        if key in parity:
            print(f"  {key}: {describe(parity[key])}")
    return 0
