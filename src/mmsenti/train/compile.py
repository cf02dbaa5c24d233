"""``torch.compile`` of a model's repeated blocks, with a clean fallback to eager execution.

A model's forward takes a batch dict holding Python lists (sample ids), which would make a whole-model graph
recompile on every batch. So the blocks that do the work are compiled in place instead (``Module.compile``: the
state_dict keys do not change): the transformer layers of the text backbone, the models' own transformer blocks
and pooling layers. Sequence lengths vary from batch to batch, so shapes are marked dynamic after the first
change (dynamo's automatic dynamic shapes): a handful of compilations per block, not one per length.

Inductor on CPU generates C++ and needs a compiler. :func:`compile_available` runs a tiny compiled function once;
when it fails (no compiler, unsupported platform) the model runs eagerly and one warning says why. Errors while
compiling a block later also fall back to eager for that block (``suppress_errors``), with dynamo's warning.
"""

from __future__ import annotations

import logging
from functools import cache

import torch
from torch import nn

log = logging.getLogger(__name__)


@cache
def compile_available() -> tuple[bool, str]:
    """Whether ``torch.compile`` (inductor) works here, and if not, why (checked once per process)."""
    if not hasattr(torch, "compile"):
        return False, f"torch {torch.__version__} has no torch.compile"
    try:
        fn = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2.0 + 1.0, backend="inductor", fullgraph=True)
        x = torch.randn(8)
        if not torch.allclose(fn(x), torch.nn.functional.gelu(x) * 2.0 + 1.0, atol=1e-6):
            return False, "a test function compiled to wrong results"
    except Exception as e:  # no C++ compiler, missing headers, unsupported Python: any failure means eager
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return False, f"{type(e).__name__}: {first[:200]}"
    return True, ""


def compile_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks to compile: HF transformer layers and the blocks the model names (``compiled_blocks``: its
    transformer, cross-attention and pooling blocks).

    Outermost matches only (a compiled block's submodules are part of its graph).
    """
    kinds: tuple[type, ...] = tuple(getattr(model, "compiled_blocks", ()))
    out: list[tuple[str, nn.Module]] = []
    taken: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        is_hf_layer = type(m).__name__.endswith("Layer") and type(m).__module__.startswith("transformers.")
        if isinstance(m, kinds) or is_hf_layer:
            out.append((name, m))
            taken.append(name)
    return out


def compile_model(model: nn.Module, mode: str | None = None) -> list[str]:
    """Compile ``model``'s blocks in place (see the module docstring); returns their names ([] = eager).

    Args:
        mode: ``torch.compile`` mode (None: the default; "max-autotune-no-cudagraphs" compiles much longer).
    """
    ok, why = compile_available()
    if not ok:
        log.warning("torch.compile is not available here (%s): training runs eagerly", why)
        return []
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # a block that fails to compile runs eagerly instead
    # Every layer of a kind shares one compiled graph, but each length change recompiles until shapes go dynamic.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    names = []
    for name, m in compile_targets(model):
        m.compile(mode=mode)
        names.append(name)
    log.info("torch.compile: %d blocks compiled (%s)", len(names),
             ", ".join(sorted({type(m).__name__ for _, m in compile_targets(model)})))
    return names
