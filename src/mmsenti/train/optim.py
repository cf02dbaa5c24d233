"""AdamW with parameter groups chosen by name, and warm-up + decay schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from mmsenti.config import OptimConfig


def _no_decay(name: str, param: nn.Parameter, extra: set[str]) -> bool:
    # Biases, norm scales and learned tokens/embedding tables are not decayed (BERT/ViT practice).
    return param.ndim <= 1 or name.endswith(".bias") or name in extra or "norm" in name.lower() or "embeddings" in name


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Four groups: {backbone, new layers} × {decay, no decay}, by parameter name; frozen params skipped."""
    prefixes = tuple(getattr(model, "backbone_prefixes", ()))
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    backbone_lr = cfg.backbone_lr if cfg.backbone_lr is not None else cfg.lr
    groups: dict[tuple[bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_backbone = bool(prefixes) and name.startswith(prefixes)
        decay = not _no_decay(name, p, extra)
        key = (is_backbone, decay)
        if key not in groups:
            groups[key] = {
                "params": [], "names": [], "lr": backbone_lr if is_backbone else cfg.lr,
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "group": f"{'backbone' if is_backbone else 'new'}{'' if decay else '/no_decay'}",
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def adamw_kernel(cfg: OptimConfig) -> dict[str, bool]:
    """``fused`` / ``foreach`` arguments of ``torch.optim.AdamW`` for ``optim.implementation``."""
    impl = "fused" if cfg.implementation == "auto" else cfg.implementation
    return {"fused": impl == "fused", "foreach": impl == "foreach"}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **adamw_kernel(cfg))


def lr_lambda(cfg: OptimConfig, total_steps: int):
    warmup = int(cfg.warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
