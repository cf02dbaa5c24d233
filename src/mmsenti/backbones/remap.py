"""Key remapping from third-party checkpoint layouts onto timm models, and strict state-dict loading.

The remapping functions are pure (state dict in, state dict out, no model built and no file read), so they are
tested on synthetic state dicts as well as on the real packaged files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mmsenti.backbones.weights import WeightsError

Shape = tuple[int, ...]

# Blocks per stage of MobileNetV2 (any width multiplier): torchvision numbers them features.1..17 in one run,
# timm as blocks.<stage>.<index>.
_MOBILENETV2_STAGES = (1, 2, 3, 4, 3, 3, 1)


def _suffix(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def efficientnet_lite0_to_timm(
    state_dict: Mapping[str, torch.Tensor], timm_keys: Mapping[str, Any] | Sequence[str]
) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch style EfficientNet-Lite0 checkpoint onto timm's ``efficientnet_lite0``.

    The source (``_conv_stem``, ``_blocks.N._expand_conv``, ``_bn0``, ..., ``_fc``) lists its tensors in the
    same module order as timm (``conv_stem``, ``blocks.S.I.conv_pw``, ``bn1``, ..., ``classifier``), so the
    mapping is positional; every pair is checked for the same parameter kind (``weight``, ``running_mean``, ...)
    and, when ``timm_keys`` carries tensors or shapes, the same shape, so a layout that differs fails loudly
    instead of loading weights into the wrong layers.

    Args:
        state_dict: the source checkpoint's tensors, in file order.
        timm_keys: the target model's ``state_dict()`` (shapes checked) or just its key names, in module order.

    Returns:
        The source tensors under timm's key names.

    Raises:
        WeightsError: the two layouts have a different number of tensors, or a pair differs in kind or shape.
    """
    targets = list(timm_keys)
    sources = list(state_dict)
    if len(sources) != len(targets):
        raise WeightsError(
            f"EfficientNet-Lite0 checkpoint has {len(sources)} tensors but the timm model has {len(targets)}; "
            "it is not the same architecture"
        )
    out: dict[str, torch.Tensor] = {}
    for src, dst in zip(sources, targets, strict=True):
        tensor = state_dict[src]
        if _suffix(src) != _suffix(dst):
            raise WeightsError(f"EfficientNet-Lite0 layouts diverge: checkpoint '{src}' lines up with timm '{dst}'")
        if isinstance(timm_keys, Mapping):
            want = _shape_of(timm_keys[dst])
            if want is not None and tuple(tensor.shape) != want:
                raise WeightsError(
                    f"EfficientNet-Lite0 shape mismatch: checkpoint '{src}' {tuple(tensor.shape)} "
                    f"vs timm '{dst}' {want}"
                )
        out[dst] = tensor
    return out


def _shape_of(value: Any) -> Shape | None:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list, torch.Size)):
        return tuple(int(v) for v in value)
    return None


def torchvision_mobilenetv2_to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchvision's ``mobilenet_v2`` keys onto timm's ``mobilenetv2_*`` models.

    torchvision numbers the blocks ``features.1..17`` with ``ConvBNReLU`` sub-sequences; timm groups them into
    seven stages of ``DepthwiseSeparableConv`` / ``InvertedResidual`` blocks with named convs and norms.

    Raises:
        WeightsError: a key that is not part of torchvision's MobileNetV2.
    """
    block_names: dict[int, str] = {}
    flat = 1
    for stage, depth in enumerate(_MOBILENETV2_STAGES):
        for i in range(depth):
            block_names[flat] = f"blocks.{stage}.{i}"
            flat += 1
    last = flat  # features.18: the 1x1 head conv
    # Position inside a block's `conv` sequence -> timm module. The first block has no expansion conv.
    first_block = {"0.0": "conv_dw", "0.1": "bn1", "1": "conv_pw", "2": "bn2"}
    other_blocks = {"0.0": "conv_pw", "0.1": "bn1", "1.0": "conv_dw", "1.1": "bn2", "2": "conv_pwl", "3": "bn3"}

    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new = None
        if m := re.fullmatch(r"features\.0\.([01])\.(\w+)", key):
            new = f"{'conv_stem' if m[1] == '0' else 'bn1'}.{m[2]}"
        elif m := re.fullmatch(rf"features\.{last}\.([01])\.(\w+)", key):
            new = f"{'conv_head' if m[1] == '0' else 'bn2'}.{m[2]}"
        elif m := re.fullmatch(r"features\.(\d+)\.conv\.([\d.]+?)\.(\w+)", key):
            idx = int(m[1])
            table = first_block if idx == 1 else other_blocks
            if idx in block_names and m[2] in table:
                new = f"{block_names[idx]}.{table[m[2]]}.{m[3]}"
        elif m := re.fullmatch(r"classifier\.1\.(weight|bias)", key):
            new = f"classifier.{m[1]}"
        if new is None:
            raise WeightsError(f"unexpected key '{key}' for a torchvision MobileNetV2 checkpoint")
        out[new] = tensor
    return out


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with one clear error for any mismatch.

    Args:
        module: the model to fill.
        state_dict: tensors keyed as ``module.state_dict()``.
        what: names the weights in the error message (e.g. ``"efficientnet_lite0 weights from /path/x.pth"``).

    Raises:
        WeightsError: keys missing from / unexpected in the checkpoint, or tensors of the wrong shape.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape (checkpoint vs model)", wrong)):
        if keys:
            shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise WeightsError(f"{what} do not fit the model ({'; '.join(problems)})")
    module.load_state_dict(state_dict, strict=True)


def to_timm_layout(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Bring a checkpoint into ``model``'s (a timm model's) key layout, converting the known foreign layouts.

    A checkpoint already in timm's layout is returned unchanged; an EfficientNet-PyTorch style
    EfficientNet-Lite checkpoint (``_conv_stem...``) and torchvision's MobileNetV2 (``features.0.0...``) are
    remapped. Anything else is returned unchanged, for :func:`load_state_dict_strict` to report what differs.
    """
    target = model.state_dict()
    if set(state_dict) == set(target):
        return dict(state_dict)
    if "_conv_stem.weight" in state_dict and "conv_stem.weight" in target:
        return efficientnet_lite0_to_timm(state_dict, target)
    if "features.0.0.weight" in state_dict and "blocks.0.0.conv_dw.weight" in target:
        return torchvision_mobilenetv2_to_timm(state_dict)
    return dict(state_dict)
