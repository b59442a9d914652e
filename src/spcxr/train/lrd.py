"""Layer-wise learning-rate decay for fine-tuning a ViT (BEiT, Bao et al. 2022; MAE, He et al. 2022).

Layers near the input hold the most general pretrained features, so they are changed least: the
learning rate of layer ``i`` is scaled by ``layer_decay ** (num_layers + 1 - i)``, where layer 0 is
the embedding, layer ``i + 1`` is encoder block ``i`` and layer ``num_layers + 1`` is everything
after the blocks (final norm, classifier head, segmentation decoder), as in MAE's
``util/lr_decay.py``. The groups are timm's ``param_groups_layer_decay``; the layers come from the
model's ``group_matcher`` (:class:`EncoderGroups`).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import group_parameters
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torch import nn

__all__ = ["EncoderGroups", "layer_ids", "param_groups_lrd"]


class EncoderGroups:
    """timm's ``group_matcher`` and ``no_weight_decay`` for a module holding a ViT as ``encoder``.

    With these, ``timm.optim.param_groups_layer_decay`` gives MAE's layers
    (``get_layer_id_for_vit``): layer 0 the embedding, layer ``i + 1`` block ``i``, and one last
    layer, at the full learning rate, for the final norm and whatever follows (head, decoder).
    timm's own ViT matcher differs in one place: it puts the final norm in the last block's layer,
    so here the norm is left unmatched, which timm maps to the last layer.
    """

    encoder: VisionTransformer

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes of the embedding and block groups, the encoder's own under ``encoder.``."""
        # timm's stem is "^a|b|c" (its "^" binds to "a" only; re.match anchors the others).
        stem = self.encoder.group_matcher(coarse=coarse)["stem"].removeprefix("^")
        return {"stem": rf"^encoder\.(?:{stem})", "blocks": r"^encoder\.blocks\.(\d+)"}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The encoder's parameters exempt from weight decay (position embedding, CLS token)."""
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}


class _Held(EncoderGroups, nn.Module):
    """A bare ViT held as ``encoder``, so that it gets the layers of :class:`EncoderGroups`."""

    def __init__(self, encoder: VisionTransformer) -> None:
        super().__init__()
        self.encoder = encoder


def _grouped(model: nn.Module) -> nn.Module:
    return _Held(model) if isinstance(model, VisionTransformer) else model


def layer_ids(model: nn.Module) -> dict[str, int]:
    """The layer of every parameter of ``model`` (by name), from its timm ``group_matcher``."""
    return group_parameters(model, model.group_matcher(coarse=False), reverse=True)


def param_groups_lrd(
    model: nn.Module,
    *,
    weight_decay: float,
    layer_decay: float,
    num_layers: int | None = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise learning-rate scales.

    The optimiser's step sets each group's ``lr`` to ``base_lr * group["lr_scale"]`` (as MAE's
    ``adjust_learning_rate``). 1-D parameters (norm weights, biases) and those in the model's
    ``no_weight_decay()`` (position embedding, CLS token) get no weight decay; frozen parameters
    (``requires_grad=False``) are left out.

    Args:
        model: a timm ViT, or a model holding one as ``encoder`` with the ``group_matcher`` of
            :class:`EncoderGroups` (Classifier, Segmenter).
        weight_decay: weight decay of the decayed groups.
        layer_decay: per-layer factor (1.0: no decay; MAE uses 0.65-0.75).
        num_layers: the encoder's number of blocks, checked against the model; ``None``: not
            checked.

    Returns:
        Non-empty groups ordered by layer, decayed first, each ``{"name": "layer<i>_decay" |
        "layer<i>_no_decay", "params", "weight_decay", "lr_scale"}``.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    model = _grouped(model)
    layers = layer_ids(model)
    blocks = max(layers.values()) - 1
    if num_layers is not None and blocks != num_layers:
        relation = "beyond" if blocks > num_layers else "fewer than"
        raise ValueError(f"the model has {blocks} blocks, {relation} num_layers={num_layers}")
    names = {id(param): name for name, param in model.named_parameters()}
    # timm returns its groups unnamed: a placeholder decay of 1.0 marks the decayed ones (also
    # when weight_decay is 0).
    groups = param_groups_layer_decay(
        model,
        weight_decay=1.0,
        no_weight_decay_list=model.no_weight_decay(),
        layer_decay=layer_decay,
    )
    for group in groups:
        decayed = group["weight_decay"] == 1.0
        group["weight_decay"] = weight_decay if decayed else 0.0
        layer = layers[names[id(group["params"][0])]]
        group["name"] = f"layer{layer}_{'decay' if decayed else 'no_decay'}"
    # Sorted as before timm built them, so saved optimiser states still line up on resume.
    return sorted(groups, key=lambda g: (layers[names[id(g["params"][0])]], g["name"]))
