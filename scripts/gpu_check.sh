#!/usr/bin/env bash
# GPU check (about 3-5 minutes) for a machine with an NVIDIA GPU. Not part of the CPU test suite.
#
#   1. torchrun, 1 GPU, DDP over NCCL + bf16 autocast: INFIG on the built-in scenes data (configs/infig/scenes.yaml,
#      2 epochs of 1,000 posts) through `mmsenti train`; checks the run directory and that it ran on CUDA in bf16.
#   2. The paper preset's architectures (DeBERTa-v3-base + ResNet-50 → 6 layers + CLIP ViT-B/32, GAM + HFAM) with
#      random weights at the paper's shapes (batch 64, 128 text tokens, 224-pixel images, DeBERTa's 128k vocabulary),
#      forward + backward + AdamW through the trainer's DDP step under torchrun, bf16 and fp32: peak memory and
#      median step time.
#
#   scripts/gpu_check.sh                 # needs CUDA; exits 2 with one line when there is none
#   GPU_CHECK_CPU=1 scripts/gpu_check.sh # dry run of the same code on CPU (gloo, fp32, batch 2, 1 epoch of 64 posts)
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3); OUT (default: a temporary directory).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1  # random weights only: nothing is downloaded
OUT="${OUT:-$(mktemp -d -t mmsenti-gpu-check.XXXXXX)}"
CPU="${GPU_CHECK_CPU:-0}"
T0=$SECONDS

if [[ "$CPU" != 1 ]]; then
    if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check: no CUDA device visible to PyTorch (torch.cuda.is_available() is False); this check needs a GPU" \
             "(GPU_CHECK_CPU=1 runs its code on CPU)" >&2
        exit 2
    fi
    "$PYTHON" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}')"
    PRECISION=bf16; SCENES=(--set data.num_train=1000 --set optim.epochs=2); BATCH=64; STEPS=10
else
    echo "gpu_check: CPU dry run (gloo, fp32): checks the script, not a GPU"
    PRECISION=fp32; SCENES=(--set data.num_train=64 --set optim.epochs=1); BATCH=2; STEPS=2
fi
echo "gpu_check: output in $OUT"

# ---------------------------------------------------------------------------------- 1. scenes INFIG, DDP + bf16
echo "gpu_check: [1/2] torchrun --nproc-per-node 1: INFIG on scenes, DDP, $PRECISION"
timeout 240 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 -m mmsenti train \
    --config configs/infig/scenes.yaml "${SCENES[@]}" --set data.num_dev=200 --set data.num_test=200 \
    --set run.precision="$PRECISION" --set run.cache_dir="$OUT/cache" --out "$OUT/scenes" --quiet
"$PYTHON" - "$OUT/scenes" "$PRECISION" <<'EOF'
import json, sys
from pathlib import Path
run, precision = Path(sys.argv[1]), sys.argv[2]
log = (run / "train.log").read_text()
assert "distributed training: 1 process" in log, "the run did not go through the process group (DDP)"
want = "bfloat16 autocast" if precision == "bf16" else "fp32"
assert f", {want}" in log, f"the log does not say {want}"
info = json.loads((run / "run_info.json").read_text())
metrics = json.loads((run / "metrics.json").read_text())
assert (run / "model" / "model.safetensors").is_file()
print(f"gpu_check: [1/2] ok: {info['device']}, {want}; test accuracy {metrics['test']['accuracy']:.3f}, "
      f"weighted F1 {metrics['test']['f1_weighted']:.3f}")
EOF

# ------------------------------------------------------------------------ 2. paper architectures, paper shapes
echo "gpu_check: [2/2] paper preset, random weights, batch $BATCH: forward + backward + AdamW under DDP"
cat > "$OUT/paper_step.py" <<'EOF'
"""One process under torchrun: the paper preset's INFIG at paper shapes, timed in bf16 (on CUDA) and fp32."""
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

from mmsenti.config import load_config
from mmsenti.data.base import Sample
from mmsenti.distributed import Distributed, attach_gather
from mmsenti.losses import total_loss
from mmsenti.models.base import TaskInfo, build_model
from mmsenti.models.encoders import build_processor
from mmsenti.train.optim import build_optimizer
from mmsenti.train.trainer import TrainStep
from mmsenti.utils import autocast, autocast_dtype

batch, steps = int(sys.argv[1]), int(sys.argv[2])
d = Distributed.from_env()
device = d.device("auto")
cfg = load_config("configs/presets/infig-paper.yaml", [
    "data.name=mvsa-single", "model.text_encoder.pretrained=false", "model.image_encoder.pretrained=false",
    "model.clip.pretrained=false", "model.text_encoder.arch={vocab_size: 128100}",  # DeBERTa-v3's vocabulary
    "model.clip.arch={text_config: {vocab_size: 49408}}", "model.top_j=2",
])
rng = np.random.default_rng(0)
words = [f"w{i}" for i in range(3000)]
texts = [" ".join(rng.choice(words, 200)) for _ in range(batch)]  # longer than 128 tokens: truncated to 128
samples = [Sample(id=str(i), label=i % 3, text=texts[i],
                   image=Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8))) for i in range(batch)]
proc = build_processor(cfg.model, texts, "classification")
info = TaskInfo("classification", ["negative", "neutral", "positive"])
torch.manual_seed(0)
model = build_model(cfg.model, info, proc, load_weights=False).to(device).train()
attach_gather(model, d.all_gather)
step_module = d.wrap(TrainStep(model), device, find_unused_parameters=False)
opt = build_optimizer(model, cfg.optim)
b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in proc(samples).items()}
n_params = sum(p.numel() for p in model.parameters()) / 1e6
n_train = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
print(f"gpu_check: paper INFIG {n_params:.0f}M parameters ({n_train:.0f}M trained); input_ids {tuple(b['input_ids'].shape)}, "
      f"pixel_values {tuple(b['pixel_values'].shape)}, clip_pixel_values {tuple(b['clip_pixel_values'].shape)}")
for precision in (["bf16", "fp32"] if device.type == "cuda" else ["fp32"]):
    amp = autocast_dtype(precision, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for s in range(steps + 2):
        t0 = time.perf_counter()
        with autocast(device, amp):
            terms = step_module(b)
            loss = total_loss(terms)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.on_optimizer_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if s >= 2:
            times.append(time.perf_counter() - t0)
        assert torch.isfinite(loss), f"non-finite loss in {precision}: {terms}"
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    ms = 1000 * statistics.median(times)
    print(f"gpu_check: [2/2] {precision}: step {ms:.0f} ms ({batch / ms * 1000:.0f} samples/s), peak memory "
          f"{peak:.1f} GiB; loss_sc {terms['loss_sc'].item():.3f} loss_g {terms['loss_g'].item():.3f} "
          f"loss_f {terms['loss_f'].item():.3f}")
d.close()
EOF
timeout 240 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 "$OUT/paper_step.py" "$BATCH" "$STEPS"
echo "gpu_check: ok in $((SECONDS - T0)) s"
