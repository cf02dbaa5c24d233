"""Training-step throughput of INFIG-lite on CPU: today's path against the optimised one, FLOPs and fraction of peak.

    python benchmarks/train_speed.py                           # HFM text and cm_memes image+text, real data
    python benchmarks/train_speed.py --workloads hfm-text --steps 40
    python benchmarks/train_speed.py --no-extras --no-uncached # the shipped path only (no compile / bf16 rows)

For each workload (INFIG-lite on HFM text with MiniLM's top 2 layers fine-tuned; INFIG-lite on CM-Off-Meme
image+text with GAM + HFAM; the generated scenes data when ../shared/data is absent) it measures, in one process:

* **samples/s** of a training step (collate, forward, loss, backward, clip, AdamW, zero_grad) along a ladder:
  "today's path" (every optimisation switched off), then each switch turned on in turn up to the shipped
  defaults, then opt-in extras (``run.compile``, ``run.precision=bf16``) and, for reference, today's path with the
  frozen-feature cache off. Every row starts from the same weights and runs the first batches of epoch 0 of the
  same samples; rows with length bucketing see other batches of the same epoch (a random draw of them), which is
  what their training would see.
* the **FLOPs** of those steps, forward + backward, counted with ``torch.utils.flop_counter.FlopCounterMode``
  (plus a formula for CPU flash attention, which it does not count by itself), and the **useful FLOPs**: the same
  model on each sample's real tokens alone, through the layers a cached run must execute (the trainable layers,
  GAM's momentum encoders included). The batch-level losses are taken from the batch: HFAM's token-similarity
  FLOPs scaled by the batch's fraction of real text tokens, GAM's as they are.
* the **fp32 matmul peak** of this machine in the same run, with the same threads: the best GFLOP/s of a plain
  ``torch.mm`` loop of 2048² matrices (before and after the workloads), and so the raw and useful fraction of peak.
* a **breakdown** of the shipped path and today's: the step's phases, HFAM and GAM (isolated replays), and what the
  profiler attributes to matmuls, attention, dropout, other ops and time outside any torch op (Python, autograd).

Frozen-feature cache entries are kept in ``--cache-dir`` (default: the trainer's), so a second run skips their build.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

WORKLOADS = {
    "hfm-text": {"config": "configs/lite/hfm-text.yaml", "data": "hfm",
                 "fallback": ["data.name=scenes", "data.root=null"], "label": "INFIG-lite, HFM text"},
    "cm-memes": {"config": "configs/lite/cm-memes.yaml", "data": "cm_memes",
                 "fallback": ["data.name=scenes", "data.root=null"], "label": "INFIG-lite, cm_memes image+text"},
}
# Today's path: every optimisation of issue #19 switched off. The ladder turns them on in this order.
TODAY = [
    ("data.bucket_by_length", False, "length bucketing"),
    ("model.attention", "mha", "SDPA attention"),
    ("optim.implementation", "for-loop", "fused AdamW"),
    ("run.cache_dtype", "float32", "fp16 feature cache"),
    ("run.compile", False, "torch.compile"),
    ("run.precision", "auto", "bf16 autocast"),  # auto = fp32 on CPU
]
EXTRAS = [("run.compile", True, "torch.compile"), ("run.precision", "bf16", "bf16 autocast")]


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        base = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add(((base / "physical_package_id").read_text().strip(), (base / "core_id").read_text().strip()))
        except OSError:
            cores.add(("", str(c)))
    return max(1, len(cores))


# What decides whether bf16 autocast pays on a CPU: bf16 dot-product instructions (AVX512-BF16, or AMX tiles).
# Without them (AVX2 only) bf16 is converted to fp32 around every product and runs slower than fp32.
BF16_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> tuple[str, dict[str, bool]]:
    """The CPU's model name and which of :data:`BF16_FLAGS` it has, read from ``/proc/cpuinfo`` (Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown CPU (no /proc/cpuinfo)", {}
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's (all cores of a machine are alike)
    flags = set(fields.get("flags", "").split())
    return fields.get("model name", "unknown CPU"), {f: f in flags for f in BF16_FLAGS}


def describe_cpu(cpuinfo: str | None = None) -> str:
    name, flags = cpu_flags(cpuinfo)
    if not flags:
        return f"CPU: {name}"
    fast = flags["avx512_bf16"] or flags["amx_bf16"]
    return (f"CPU: {name}; " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in flags.items())
            + f" (bf16 autocast: {'expect it fast here' if fast else 'no bf16 dot products, expect it slower than fp32'})")


def matmul_peak(dtype_name: str = "float32", n: int = 2048, seconds: float = 3.0) -> float:
    """Best GFLOP/s of a plain ``torch.mm`` loop over ``seconds`` (5 rounds), with the current threads."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)
    t0 = time.perf_counter()
    torch.mm(a, b, out=out)
    reps = max(1, int(seconds / 5 / max(1e-4, time.perf_counter() - t0)))
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


def _flop_mapping():
    """FlopCounterMode formulas for CPU flash attention (not in torch's registry)."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def fwd(query, key, value, *args, out_val=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_val=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    return {aten._scaled_dot_product_flash_attention_for_cpu: fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}


def count_flops(fn) -> tuple[int, dict[str, int]]:
    """Total FLOPs of ``fn()`` and FLOPs per module name (forward and backward attributed to the module)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as fc:
        fn()
    per_module = {name: sum(ops.values()) for name, ops in fc.get_flop_counts().items()}
    return fc.get_total_flops(), per_module


def _module_flops(per_module: dict[str, int], attr: str, cls: str) -> int:
    """FLOPs of a loss module, whatever name the tracker gave it (``Infig.hfam_loss`` or its class name)."""
    names = [n for n in per_module if n.endswith("." + attr) or n == attr or n == cls or n.endswith("." + cls)]
    return max((per_module[n] for n in names), default=0)


class Workload:
    """Data, preprocessing and the initial weights of one benchmark workload."""

    def __init__(self, name: str, args: argparse.Namespace):
        import torch

        from mmsenti.config import load_config
        from mmsenti.models.base import TaskInfo, build_model
        from mmsenti.models.encoders import build_processor
        from mmsenti.registry import DATASETS

        spec = WORKLOADS[name]
        self.name, self.args = name, args
        root = Path(args.data_root) / spec["data"]
        self.base = [f"data.root={root}"] if root.is_dir() else list(spec["fallback"])
        self.base += list(args.set)
        self.config_path = str(ROOT / spec["config"])
        cfg = load_config(self.config_path, self.base)
        self.shipped = cfg
        bundle = DATASETS.get(cfg.data.name).builder(cfg.data)
        self.bundle = bundle
        self.samples = bundle.split("train")[: args.samples]
        self.label = f"{spec['label']}" + ("" if root.is_dir() else " (generated scenes data: ../shared absent)")
        self.processor = build_processor(cfg.model, [s.text or "" for s in self.samples], bundle.task)
        self.info = TaskInfo(bundle.task, bundle.label_names)
        torch.manual_seed(0)
        self.init = build_model(cfg.model, self.info, self.processor).state_dict()
        self.lengths = None

    def config(self, overrides: list[str]):
        from mmsenti.config import load_config

        return load_config(self.config_path, self.base + overrides)


class Variant:
    """One row of the ladder: a model, optimiser and collate function built from a config, and its batches."""

    def __init__(self, wl: Workload, label: str, overrides: list[str], cache: bool = True):
        import torch

        from mmsenti.models.base import build_model
        from mmsenti.train.cache import CachedCollator, default_cache_dir, open_or_build
        from mmsenti.train.optim import build_optimizer, build_scheduler
        from mmsenti.train.sampler import build_batch_sampler, sample_lengths
        from mmsenti.utils import autocast_dtype

        self.wl, self.label, self.overrides = wl, label, overrides
        self.cfg = cfg = wl.config(overrides + ([] if cache else ["run.feature_cache=false"]))
        self.model = build_model(cfg.model, wl.info, wl.processor)
        self.model.load_state_dict(wl.init)
        self.model.train()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, 1000)
        self.amp = autocast_dtype(cfg.run.precision, torch.device("cpu"))
        self.cached = bool(cfg.run.feature_cache and self.model.cache_spec())
        self.cache_build_s = 0.0
        if self.cached:
            t0 = time.perf_counter()
            store = open_or_build(wl.args.cache_dir or default_cache_dir(cfg.run.cache_dir), self.model,
                                  wl.processor, wl.samples, sources=wl.bundle.sources, dtype=cfg.run.cache_dtype)
            self.cache_build_s = time.perf_counter() - t0
            self.collate = CachedCollator(wl.processor, store, self.model.cache_replaces())
        else:
            self.collate = wl.processor
        lengths = None
        if cfg.data.bucket_by_length:
            if wl.lengths is None:
                wl.lengths = sample_lengths(wl.processor, wl.samples)
            lengths = wl.lengths
        self.compiled = []
        self.warmup = wl.args.warmup
        if cfg.run.compile:
            import torch._inductor.config

            from mmsenti.train.compile import compile_model

            torch._inductor.config.compile_threads = 1  # no compile workers left running beside the other rows

            self.compiled = compile_model(self.model)
            self.warmup = wl.args.compile_warmup
        batches: list[list[int]] = []
        for epoch in range(1000):  # epochs 0, 1, ... until there are enough batches (small datasets)
            if len(batches) >= self.warmup + wl.args.steps:
                break
            batches += list(build_batch_sampler(len(wl.samples), cfg.data.batch_size, cfg.run.seed, epoch, 0,
                                                lengths, cfg.data.bucket_pool))
        self.batches = [[wl.samples[i] for i in b] for b in batches[: self.warmup + wl.args.steps]]

    def step(self, samples) -> dict[str, float]:
        """One training step; seconds per phase."""
        import torch

        from mmsenti.losses import total_loss
        from mmsenti.utils import autocast

        t = [time.perf_counter()]
        batch = self.collate(samples)
        t.append(time.perf_counter())
        with autocast(torch.device("cpu"), self.amp):
            out = self.model(batch)
            t.append(time.perf_counter())
            loss = total_loss(self.model.compute_loss(out, batch))
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.model, "on_optimizer_step"):  # INFIG: the momentum encoders' EMA step
            self.model.on_optimizer_step()
        t.append(time.perf_counter())
        names = ("collate", "forward", "loss", "backward", "optimizer")
        return dict(zip(names, (b - a for a, b in zip(t, t[1:], strict=False)), strict=True))

    def warm(self) -> None:
        t0 = time.perf_counter()
        for b in self.batches[: self.warmup]:
            self.step(b)
        self.warm_s = time.perf_counter() - t0
        self.phases: dict[str, float] = defaultdict(float)
        self.done = 0  # timed steps so far

    def timed(self, n: int) -> None:
        """The next ``n`` timed steps."""
        for b in self.batches[self.warmup + self.done:][:n]:
            for k, v in self.step(b).items():
                self.phases[k] += v
            self.done += 1

    def result(self) -> dict:
        timed = self.batches[self.warmup:][: self.done]
        total = sum(self.phases.values())
        n = sum(len(b) for b in timed)
        tokens = 0
        if "text" in self.wl.processor.modalities:
            tokens = sum(self.wl.processor(b, load_images=False)["attention_mask"].shape[1] * len(b) for b in timed)
        return {"samples_s": n / total, "ms_step": 1000 * total / len(timed), "phases": dict(self.phases),
                "steps": len(timed), "samples": n, "warm_s": self.warm_s, "padded_tokens": tokens / max(1, n),
                "batches": timed}


def _shape(processor, samples) -> tuple[int, int]:
    """What a batch's FLOPs depend on: its size and padded text length (images all have one size)."""
    if "text" not in processor.modalities:
        return len(samples), 0
    return len(samples), int(processor(samples, load_images=False)["attention_mask"].shape[1])


class RawFlops:
    """FLOPs (forward + backward) of batches on a row's path, counted eagerly on a copy of its model; memoised by
    batch shape (FlopCounterMode counts by shapes alone)."""

    def __init__(self, v: Variant):
        self.v, self.model, self.memo = v, copy.deepcopy(v.model), {}
        self.model.train()

    def of(self, batches) -> int:
        from mmsenti.losses import total_loss

        total = 0
        for b in batches:
            key = _shape(self.v.wl.processor, b)
            if key not in self.memo:
                batch = self.v.collate(b)

                def fn(batch=batch):
                    loss = total_loss(self.model.compute_loss(self.model(batch), batch))
                    loss.backward()

                self.memo[key] = count_flops(fn)[0]
                self.model.zero_grad(set_to_none=True)
            total += self.memo[key]
        return total


class Useful:
    """Useful FLOPs: each sample alone (no padding) through the layers a cached run executes, plus the batch losses."""

    def __init__(self, v: Variant):
        from mmsenti.train.cache import CachedCollator, default_cache_dir, open_or_build

        self.model = copy.deepcopy(v.model)
        self.model.train()
        wl = v.wl
        if v.cached:
            self.collate = v.collate
        else:  # useful work is defined on the cached path
            store = open_or_build(wl.args.cache_dir or default_cache_dir(v.cfg.run.cache_dir), self.model,
                                  wl.processor, wl.samples, sources=wl.bundle.sources, dtype="float32")
            self.collate = CachedCollator(wl.processor, store, self.model.cache_replaces())
        self.processor = wl.processor
        self.per_sample: dict[tuple[int, int], int] = {}  # by shape: (1, real length)
        self.batch_losses: dict[tuple[int, int], tuple[int, int]] = {}  # by batch shape: (HFAM, GAM) FLOPs

    def _losses(self, per_module: dict[str, int]) -> tuple[int, int]:
        return (_module_flops(per_module, "hfam_loss", "FineGrainedAlignmentLoss"),
                _module_flops(per_module, "gam_loss", "GlobalAlignmentLoss"))

    def _run(self, samples) -> tuple[int, dict[str, int], dict]:
        from mmsenti.losses import total_loss

        batch = self.collate(samples)

        def fn():
            loss = total_loss(self.model.compute_loss(self.model(batch), batch))
            loss.backward()

        total, per_module = count_flops(fn)
        self.model.zero_grad(set_to_none=True)
        return total, per_module, batch

    def of(self, batches) -> int:
        total = 0
        batch_losses = hasattr(self.model, "hfam_loss") or hasattr(self.model, "gam_loss")
        for b in batches:
            for s in b:
                key = _shape(self.processor, [s])
                if key not in self.per_sample:
                    flops, per_module, _ = self._run([s])
                    self.per_sample[key] = flops - sum(self._losses(per_module))
                total += self.per_sample[key]
            if not batch_losses:
                continue
            key = _shape(self.processor, b)
            if key not in self.batch_losses:
                self.batch_losses[key] = self._losses(self._run(b)[1])
            hfam, gam = self.batch_losses[key]
            if hfam:  # its similarity tensor is linear in the padded text length: keep the real tokens' share
                mask = self.processor(b, load_images=False)["attention_mask"][:, 1:]
                hfam = hfam * float(mask.sum()) / mask.numel()
            total += int(hfam) + gam
        return total


def alignment_times(v: Variant, reps: int = 5) -> dict[str, float]:
    """Seconds per step of HFAM (loss forward + backward) and GAM (momentum update + momentum encoders + loss
    forward + backward), replayed in isolation on one batch."""
    import torch

    model = copy.deepcopy(v.model)
    model.train()
    batch = v.collate(v.batches[-1])
    out = model(batch)
    res = {}

    def median(fn):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    if "fine" in out:
        img, txt, mask, img_mask = out["fine"]
        img = [x.detach().requires_grad_() for x in img]
        txt = [x.detach().requires_grad_() for x in txt]

        def hfam():
            model.hfam_loss(img, txt, mask, model.hfam_temperature(), img_mask=img_mask)["loss_f"].backward()

        res["HFAM (loss forward + backward)"] = median(hfam)
    if "global" in out:
        (i_g, t_g), (i_m, t_m) = out["global"], out["global_m"]
        i_g, t_g = i_g.detach().requires_grad_(), t_g.detach().requires_grad_()

        def momentum():
            model.update_momentum_encoders()
            with torch.no_grad():
                img_m, txt_m, _, _ = model._encode(batch, "_m")
                model._global_features(img_m, txt_m, None, "_m")

        def gam():
            model.gam_loss(i_g, t_g, i_m, t_m, ids=out["sample_index"])["loss_g"].backward()

        res["GAM momentum encoders + update (forward)"] = median(momentum)
        res["GAM loss (forward + backward)"] = median(gam)
    return res


CATEGORIES = [
    ("matmul (mm/addmm/bmm)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkl_linear",
                               "mkldnn", "aten::matmul", "aten::linear")),
    ("attention kernels", ("scaled_dot_product", "flash_attention", "aten::_softmax", "aten::softmax")),
    ("dropout RNG", ("aten::bernoulli", "aten::native_dropout", "aten::dropout")),
    ("optimizer kernels", ("adam", "aten::_foreach", "aten::addcdiv", "aten::addcmul", "aten::lerp", "aten::sqrt")),
    ("top-k / sort", ("aten::topk", "aten::sort")),
    ("norms, activations, other ops", ("aten::", "inductor", "Torch-Compiled", "CompiledFunction")),
]


def op_profile(v: Variant, steps: int = 6) -> dict[str, float]:
    """Share of step time per op category (profiler self time), and outside any torch op."""
    from torch.profiler import ProfilerActivity, profile

    batches = v.batches[v.warmup:][:steps]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for b in batches:
            v.step(b)
        wall = time.perf_counter() - t0
    shares: dict[str, float] = defaultdict(float)
    inside = 0.0
    for e in prof.key_averages():
        if getattr(e, "is_user_annotation", False) or e.key.startswith(("Optimizer.", "ProfilerStep", "autograd::")):
            continue
        t = e.self_cpu_time_total / 1e6
        inside += t
        name = e.key.lower()
        for cat, keys in CATEGORIES:
            if any(k.lower() in name for k in keys):
                shares[cat] += t
                break
        else:
            shares["norms, activations, other ops"] += t
    shares["outside torch ops (Python, autograd engine)"] = max(0.0, wall - inside)
    return {k: val / wall for k, val in shares.items()}


def fmt_switches(overrides: list[str]) -> str:
    return ", ".join(o.split("=", 1)[0].split(".")[-1] + "=" + o.split("=", 1)[1] for o in overrides)


def bench(name: str, args: argparse.Namespace, peak: float) -> float:
    """Print the workload's tables; returns the best fp32 matmul peak seen (it is re-measured between rounds)."""
    wl = Workload(name, args)
    shipped = wl.shipped
    value = {key: _get(shipped, key) for key, _, _ in TODAY}
    print(f"\n## {wl.label}: {len(wl.samples)} training samples, batch {shipped.data.batch_size}, "
          f"{args.steps} timed steps after {args.warmup} warm-up\n")
    today = [f"{k}={_yaml(v)}" for k, v, _ in TODAY]
    rows: list[tuple[str, list[str], bool]] = [("today's path", today, True)]
    current = list(today)
    for key, old, label in TODAY:
        if value[key] != old:
            current = [o for o in current if not o.startswith(key + "=")] + [f"{key}={_yaml(value[key])}"]
            rows.append((f"+ {label}", list(current), True))
    rows[-1] = (rows[-1][0] + " = optimised (shipped defaults)", rows[-1][1], True)
    if args.extras:
        for key, val, label in EXTRAS:
            if value[key] != val:
                rows.append((f"shipped + {label} (opt-in)", [f"{key}={_yaml(val)}"], True))
    if args.uncached:
        rows.append(("today's path, cache off", today, False))

    variants = []
    for label, overrides, cache in rows:
        progress(f"{name}: building and warming up '{label}'")
        variants.append(Variant(wl, label, overrides, cache))
        variants[-1].warm()
    # Rows take turns, a few steps at a time (in a rotating order), so a change in the machine's load during the
    # run slows every row alike and the ratios stay fair; the matmul peak is measured between rounds too.
    # Compiled rows are timed on their own afterwards: inductor compiles (and recompiles, as lengths vary) in worker
    # processes that would slow the rows timed beside them.
    eager = [v for v in variants if not v.compiled]
    rounds = args.rounds or args.steps
    per_round = -(-args.steps // rounds)
    for r in range(rounds):
        progress(f"{name}: timing round {r + 1}/{rounds}")
        for v in eager[r % len(eager):] + eager[: r % len(eager)]:
            v.timed(per_round)
        if r % 4 == 3:
            peak = max(peak, matmul_peak(seconds=1.0))
    for v in variants:
        if v.compiled:
            progress(f"{name}: timing '{v.label}'")
            v.timed(args.steps)
    results = []
    raw: dict[bool, RawFlops] = {}  # cached path or not → counter
    useful = None
    for v in variants:
        progress(f"{name}: counting FLOPs of '{v.label}'")
        r = v.result()
        raw.setdefault(v.cached, RawFlops(v))
        useful = useful or Useful(v)
        r["flops"], r["useful"] = raw[v.cached].of(r["batches"]), useful.of(r["batches"])
        r["label"], r["overrides"], r["variant"] = v.label, v.overrides, v
        results.append(r)

    base = results[0]["samples_s"]
    print("| path | switches (config keys) | samples/s | ms/step | × today | padded tokens/sample | compile s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        v = r["variant"]
        comp = f"{r['warm_s']:.0f} (its {v.warmup} warm-up steps)" if v.compiled else "–"
        cache = "" if v.cached else " feature_cache=false"
        print(f"| {r['label']} | {fmt_switches(r['overrides'])}{cache} | {r['samples_s']:.1f} | {r['ms_step']:.0f} | "
              f"{r['samples_s'] / base:.2f}× | {r['padded_tokens']:.1f} | {comp} |")
    if wl.lengths is not None:
        print(f"\nreal word pieces per sample: {statistics.mean(wl.lengths):.1f} (mean, [CLS] and [SEP] included)")
    print(f"\nfp32 matmul peak (best in this run so far, {args.threads} threads): {peak:.0f} GFLOP/s\n")
    print("| path | GFLOP/sample raw | useful | useful share | raw GFLOP/s | raw % of peak | useful GFLOP/s | "
          "useful % of peak |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        raw_s, use_s = r["flops"] / r["samples"], r["useful"] / r["samples"]
        rate, urate = raw_s * r["samples_s"] / 1e9, use_s * r["samples_s"] / 1e9
        print(f"| {r['label']} | {raw_s / 1e9:.3f} | {use_s / 1e9:.3f} | {use_s / raw_s:.0%} | {rate:.0f} | "
              f"{rate / peak:.0%} | {urate:.0f} | {urate / peak:.0%} |")

    optimised = next(x for x in results if x["label"].endswith("(shipped defaults)"))
    for r in [results[0]] + ([optimised] if optimised is not results[0] else []):
        v = r["variant"]
        progress(f"{name}: breakdown of '{r['label']}'")
        print(f"\nbreakdown of '{r['label']}' ({r['ms_step']:.0f} ms/step):\n")
        print("| part | ms/step | share |")
        print("|---|---|---|")
        for k, t in r["phases"].items():
            print(f"| {k} | {1000 * t / r['steps']:.1f} | {t / sum(r['phases'].values()):.0%} |")
        for k, t in alignment_times(v).items():
            print(f"| (isolated) {k} | {1000 * t:.1f} | {1000 * t / r['ms_step']:.0%} |")
        for k, share in sorted(op_profile(v).items(), key=lambda kv: -kv[1]):
            print(f"| (profiler) {k} | {share * r['ms_step']:.1f} | {share:.0%} |")
    return peak


def progress(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _yaml(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--samples", type=int, default=2048, help="training samples used (and cached)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=0, help="rows take turns in this many rounds (0: one step each)")
    p.add_argument("--compile-warmup", type=int, default=12, help="warm-up steps of the torch.compile row")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: physical cores)")
    p.add_argument("--cache-dir", default=None, help="feature-cache directory (default: the trainer's)")
    p.add_argument("--no-extras", dest="extras", action="store_false", help="skip the compile and bf16 rows")
    p.add_argument("--no-uncached", dest="uncached", action="store_false", help="skip the cache-off row")
    p.add_argument("--set", action="append", default=[], help="config override a.b=v for every row")
    args = p.parse_args()

    import torch

    import mmsenti  # noqa: F401  (compat shims before transformers)

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    args.threads = args.threads or physical_cores()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {args.threads} threads ({physical_cores()} physical cores), "
          f"load average {load:.2f} at start")
    print(describe_cpu())
    peak = first = matmul_peak()
    for name in args.workloads:
        peak = bench(name, args, peak)
    last = matmul_peak()
    bf16 = matmul_peak("bfloat16")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nfp32 matmul GFLOP/s: {first:.0f} at start, {last:.0f} at end, best {max(peak, last):.0f}; "
          f"bf16 matmul: {bf16:.0f} GFLOP/s; load average {load:.2f} at end")


if __name__ == "__main__":
    main()
