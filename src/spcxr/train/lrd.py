"""Layer-wise learning-rate decay for fine-tuning a ViT (BEiT, Bao et al. 2022; MAE, He et al. 2022).

Layers near the input hold the most general pretrained features, so they are changed least: the
learning rate of layer ``i`` is scaled by ``layer_decay ** (num_layers + 1 - i)``, where layer 0 is
the embedding (patch embedding, CLS token, position embedding), layer ``i + 1`` is encoder block
``i`` and layer ``num_layers + 1`` is everything after the blocks (final norm, classifier head,
segmentation decoder), which therefore trains at the full rate. The rule and the grouping are
those of MAE's ``util/lr_decay.py`` (``param_groups_lrd`` / ``get_layer_id_for_vit``).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from torch import nn

__all__ = ["layer_id", "param_groups_lrd"]

# Encoder parameters are found whether the model is a bare timm ViT ("blocks.3.attn.qkv.weight")
# or wraps one as ``encoder`` ("encoder.blocks.3..."), as Classifier, Segmenter and GMMLModel do.
_ENCODER_PREFIX = "encoder."
_EMBEDDING = ("cls_token", "pos_embed", "reg_token", "dist_token", "patch_embed", "norm_pre")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _encoder_name(name: str) -> str:
    return name.removeprefix(_ENCODER_PREFIX)


def layer_id(name: str, num_layers: int) -> int:
    """The layer of parameter ``name``: 0 embedding, ``i + 1`` block ``i``, else ``num_layers + 1``."""
    local = _encoder_name(name)
    if local.split(".", 1)[0] in _EMBEDDING:
        return 0
    match = _BLOCK.match(local)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def _count_blocks(model: nn.Module) -> int:
    indices = [
        int(match.group(1))
        for name, _ in model.named_parameters()
        if (match := _BLOCK.match(_encoder_name(name)))
    ]
    return max(indices) + 1 if indices else 0


def param_groups_lrd(
    model: nn.Module,
    *,
    weight_decay: float,
    layer_decay: float,
    num_layers: int | None = None,
    no_weight_decay: Collection[str] = frozenset({"pos_embed", "cls_token"}),
) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise learning-rate scales.

    The optimiser's step sets each group's ``lr`` to ``base_lr * group["lr_scale"]`` (as MAE's
    ``adjust_learning_rate``). Biases, 1-D parameters (norm weights) and the parameters named in
    ``no_weight_decay`` get no weight decay; frozen parameters (``requires_grad=False``) are left
    out.

    Args:
        model: a timm ViT or a module holding one as ``encoder`` (Classifier, Segmenter).
        weight_decay: weight decay of the decayed groups.
        layer_decay: per-layer factor (1.0: no decay; MAE uses 0.65-0.75).
        num_layers: number of encoder blocks; ``None`` counts them in ``model``.
        no_weight_decay: parameter names (without the ``encoder.`` prefix, or a full name's
            last component) exempt from weight decay.

    Returns:
        Non-empty groups ordered by layer, each ``{"name": "layer<i>_decay" |
        "layer<i>_no_decay", "params", "weight_decay", "lr_scale"}``.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if num_layers is None:
        num_layers = _count_blocks(model)
    exempt = set(no_weight_decay)
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        local = _encoder_name(name)
        skip = (
            param.ndim <= 1
            or name.endswith(".bias")
            or local in exempt
            or name.rsplit(".", 1)[-1] in exempt
        )
        layer = layer_id(name, num_layers)
        if _BLOCK.match(local) and layer > num_layers:
            raise ValueError(f"{name} is in block {layer - 1}, beyond num_layers={num_layers}")
        key = f"layer{layer}_{'no_decay' if skip else 'decay'}"
        if key not in groups:
            groups[key] = {
                "name": key,
                "params": [],
                "weight_decay": 0.0 if skip else weight_decay,
                "lr_scale": layer_decay ** (num_layers + 1 - layer),
                "layer": layer,
            }
        groups[key]["params"].append(param)
    ordered = sorted(groups.values(), key=lambda g: (g["layer"], g["name"]))
    for group in ordered:
        del group["layer"]
    return ordered
