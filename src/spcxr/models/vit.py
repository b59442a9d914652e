"""timm Vision Transformer backbones and their portable weight files.

The backbone is timm's ``VisionTransformer``, configured as in the GMML reference code
(Atito, Awais, Kittler, "GMML is all you need", ICIP 2023): MLP ratio 4, qkv bias, LayerNorm
eps 1e-6, learned position embedding, a CLS token, stochastic depth 0.1, no classifier. SPCXR
(Anwar et al., arXiv 2211.12944) uses ViT-S/16 at 224 x 224; chest X-rays are grayscale, so one
input channel is the default. ``save_encoder`` writes a plain timm state dict as safetensors
with a timm-format config; how to load it with timm (and as 3 channels) is in
``docs/internals.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import timm
import torch
from timm.layers import resample_abs_pos_embed, to_2tuple
from timm.models import adapt_input_conv
from timm.models.vision_transformer import VisionTransformer

from spcxr.atomic import atomic_path

__all__ = [
    "VARIANTS",
    "convert_in_chans",
    "create_encoder",
    "fit_encoder_state",
    "load_encoder",
    "map_blocks",
    "read_encoder_config",
    "save_encoder",
    "timm_name",
    "timm_overlay",
]

# Short names used in the GMML reference code (``--model vit_small``) -> timm's base names.
VARIANTS: dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}

WEIGHTS_NAME = "model.safetensors"  # timm / Hugging Face folder layout
CONFIG_NAME = "config.json"
_PATCH_WEIGHT = "patch_embed.proj.weight"
_METADATA_KEY = "spcxr"
_FORMAT_VERSION = 1

ImageSize = int | tuple[int, int]


def _base_name(arch: str) -> str:
    """The registered timm name for ``arch`` (a short name or a full timm name, tag allowed)."""
    if arch in VARIANTS:
        return VARIANTS[arch]
    name = arch.split(".", 1)[0]  # "vit_small_patch16_224.augreg_in21k" -> registry name
    if not timm.is_model(name):
        raise ValueError(
            f"unknown architecture {arch!r}: use one of {sorted(VARIANTS)} or a timm ViT name"
        )
    return name


def timm_name(arch: str, patch_size: int, img_size: ImageSize) -> str:
    """The timm model name recorded in saved weights' config.

    A short name maps to the most specific registered member of its family: the exact
    ``vit_<size>_patch<p>_<img>`` when timm registers it (``vit_small_patch8_224``,
    ``vit_base_patch16_384``), else ``..._patch<p>_224``, else ``..._patch16_224``. The patch and
    image size that the name does not carry are recorded as ``model_args`` next to it. A full timm
    name is returned unchanged (without a pretrained tag).

    Args:
        arch: ``"vit_tiny"``, ``"vit_small"``, ``"vit_base"`` or a timm ViT name.
        patch_size: patch side in pixels.
        img_size: input side (or ``(height, width)``) in pixels.
    """
    if arch not in VARIANTS:
        return _base_name(arch)
    size = arch.removeprefix("vit_")
    height, width = to_2tuple(img_size)
    candidates = [f"vit_{size}_patch{patch_size}_224", VARIANTS[arch]]
    if height == width:
        candidates.insert(0, f"vit_{size}_patch{patch_size}_{height}")
    return next(name for name in candidates if timm.is_model(name))


def create_encoder(
    arch: str = "vit_small",
    *,
    img_size: ImageSize | None = None,
    patch_size: int | None = None,
    in_chans: int = 1,
    drop_path_rate: float = 0.1,
    **timm_kwargs: Any,
) -> VisionTransformer:
    """Builds a randomly initialised timm ViT without a classifier (``num_classes=0``).

    Args:
        arch: ``"vit_tiny"`` (192/12/3), ``"vit_small"`` (384/12/6, the paper's default) or
            ``"vit_base"`` (768/12/12), or any timm name of a ``VisionTransformer``.
        img_size: input side or ``(height, width)``; a multiple of the patch size. ``None``: 224
            for the short names, the registered size for a timm name.
        patch_size: patch side; ``None``: 16 for the short names, the registered one otherwise.
        in_chans: input channels; 1 for grayscale chest X-rays.
        drop_path_rate: stochastic depth rate of the last block (0.1 in the reference).
        **timm_kwargs: passed on to ``timm.create_model`` (e.g. ``global_pool="avg"``).

    Returns:
        The encoder. timm's defaults already match the reference: qkv bias, MLP ratio 4,
        LayerNorm eps 1e-6, learned absolute position embedding and a CLS token.

    Raises:
        ValueError: unknown architecture, or an image size that is not a multiple of the patch.
        TypeError: the timm name is not a plain ``VisionTransformer``.
    """
    if arch in VARIANTS:
        img_size = 224 if img_size is None else img_size
        patch_size = 16 if patch_size is None else patch_size
        name = timm_name(arch, patch_size, img_size)
    else:
        name = _base_name(arch)
    kwargs: dict[str, Any] = dict(in_chans=in_chans, num_classes=0, drop_path_rate=drop_path_rate)
    kwargs.update(timm_kwargs)  # e.g. num_classes=2 for a classifier
    # Passed explicitly so timm records them in ``model_args`` (exported with the weights).
    if img_size is not None:
        kwargs["img_size"] = to_2tuple(img_size)
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    model = timm.create_model(name, pretrained=False, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{arch!r} builds a {type(model).__name__}, not a timm VisionTransformer")
    grid, patch = model.patch_embed.img_size, model.patch_embed.patch_size
    if any(side % p for side, p in zip(grid, patch, strict=True)):
        raise ValueError(f"image size {grid} is not a multiple of the patch size {patch}")
    return model


def convert_in_chans(
    state_dict: Mapping[str, torch.Tensor], in_chans: int
) -> dict[str, torch.Tensor]:
    """Adapts the patch-embedding kernel of a ViT state dict to ``in_chans`` input channels.

    Uses timm's ``adapt_input_conv``, the rule timm itself applies when ``create_model`` is given
    another ``in_chans``: 1 -> 3 repeats the kernel and divides it by 3, so a 3-channel model
    fed a gray image replicated 3x computes what the 1-channel model computes on the gray image;
    3 -> 1 sums over the channels, so the 1-channel model fed the gray image computes what the
    3-channel model computes on its 3x replication.

    Args:
        state_dict: a timm ViT state dict (not modified).
        in_chans: the wanted number of input channels.

    Returns:
        A shallow copy with ``patch_embed.proj.weight`` converted (the other tensors shared).
    """
    if _PATCH_WEIGHT not in state_dict:
        raise KeyError(f"state dict has no {_PATCH_WEIGHT!r}: not a timm ViT state dict")
    out = dict(state_dict)
    weight = state_dict[_PATCH_WEIGHT]
    out[_PATCH_WEIGHT] = adapt_input_conv(in_chans, weight, base_chans=weight.shape[1])
    return out


def _as_channels(value: float | Sequence[float], in_chans: int, what: str) -> list[float]:
    values = [float(value)] if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) == 1:
        values = values * in_chans
    if len(values) != in_chans:
        raise ValueError(f"{what} has {len(values)} values for {in_chans} input channels")
    return values


def _json_ready(value: Any) -> Any:
    """Tuples -> lists, recursively; raises TypeError for values JSON cannot hold."""
    return json.loads(json.dumps(value))


def _model_args(encoder: VisionTransformer, in_chans: int) -> dict[str, Any]:
    """timm construction arguments that rebuild ``encoder``'s architecture (no drop rates)."""
    # timm.create_model records its keyword arguments on the model; keep the serialisable
    # architecture ones so that ``local-dir:`` rebuilds e.g. a custom ``qkv_norm`` too.
    args = {
        key: value
        for key, value in getattr(encoder, "_model_args", {}).items()
        if "drop" not in key and key not in ("device", "dtype")
    }
    try:
        args = _json_ready(args)
    except TypeError as err:
        raise ValueError(f"encoder construction arguments are not serialisable: {args}") from err
    args.update(
        in_chans=in_chans,
        num_classes=encoder.num_classes,
        img_size=list(encoder.patch_embed.img_size),
        patch_size=encoder.patch_embed.patch_size[0],
        global_pool=encoder.global_pool,
    )
    return args


def _encoder_config(
    encoder: VisionTransformer,
    in_chans: int,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    extra_config: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The config in timm's Hugging Face format (what ``local-dir:`` reads) + an spcxr block."""
    architecture = encoder.pretrained_cfg.get("architecture")
    if not architecture:
        raise ValueError("encoder was not built by timm.create_model: no architecture name")
    height, width = encoder.patch_embed.img_size
    pretrained_cfg = {
        "tag": "spcxr",
        "custom_load": False,
        "input_size": [in_chans, height, width],
        "fixed_input_size": True,
        "interpolation": "bicubic",
        # Chest X-rays are resized whole, not centre-cropped.
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": _as_channels(mean, in_chans, "mean"),
        "std": _as_channels(std, in_chans, "std"),
        "num_classes": encoder.num_classes,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    try:
        extra = _json_ready(dict(extra_config or {}))
    except TypeError as err:
        raise ValueError(f"extra_config is not JSON serialisable: {err}") from err
    return {
        "architecture": architecture,
        "num_classes": encoder.num_classes,
        "num_features": encoder.num_features,
        "global_pool": encoder.global_pool,
        "model_args": _model_args(encoder, in_chans),
        "pretrained_cfg": pretrained_cfg,
        _METADATA_KEY: {
            "format_version": _FORMAT_VERSION,
            "embed_dim": encoder.embed_dim,
            "depth": len(encoder.blocks),
            "num_heads": encoder.blocks[0].attn.num_heads,
            "extra": extra,
        },
    }


def _export_paths(path: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a ``.safetensors`` file or a folder."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, None
    if path.suffix and not path.is_dir():
        raise ValueError(f"{path}: weights are written as .safetensors (or give a folder)")
    return path / WEIGHTS_NAME, path / CONFIG_NAME


def save_encoder(
    encoder: VisionTransformer,
    path: str | os.PathLike[str],
    *,
    in_chans: int | None = None,
    mean: float | Sequence[float] = 0.5,
    std: float | Sequence[float] = 0.25,
    extra_config: Mapping[str, Any] | None = None,
) -> Path:
    """Saves ``encoder`` as a plain timm state dict in safetensors (see the module docstring).

    Args:
        encoder: a timm ViT built by ``timm.create_model`` (e.g. via ``create_encoder``).
        path: a ``.safetensors`` file (self-describing: the config is in its header), or a folder
            that receives timm's local layout ``model.safetensors`` + ``config.json``, loadable
            with ``timm.create_model("local-dir:<folder>", pretrained=True)``.
        in_chans: export for this many input channels (``convert_in_chans``); ``None`` keeps the
            encoder's. ``in_chans=3`` is the way to produce 3-channel weights.
        mean: per-channel (or one shared) intensity mean the encoder's inputs were normalised with,
            for images scaled to [0, 1]; recorded as timm's ``pretrained_cfg["mean"]`` so that
            ``timm.data.resolve_data_config`` reproduces the normalisation. The default is spcxr's
            (``spcxr.data.augment``: mean 0.5, std 0.25); pass the values your run used.
        std: per-channel (or one shared) intensity scale, as ``mean``.
        extra_config: JSON-serialisable facts to keep with the weights (e.g. the run config).

    Returns:
        The path of the written weights file.
    """
    weights_path, config_path = _export_paths(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    source_chans = state[_PATCH_WEIGHT].shape[1]
    in_chans = source_chans if in_chans is None else in_chans
    if in_chans != source_chans:
        state = convert_in_chans(state, in_chans)
    config = _encoder_config(encoder, in_chans, mean, std, extra_config)
    metadata = {"format": "pt", _METADATA_KEY: json.dumps(config)}
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(weights_path) as tmp:
        safetensors.torch.save_file(state, tmp, metadata)
    if config_path is not None:
        text = json.dumps(config, indent=2)
        with atomic_path(config_path) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
    return weights_path


def _weights_file(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: spcxr loads weights from .safetensors only (never unpickles)")
    return path


def read_encoder_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config stored in the header of a weights file written by ``save_encoder``.

    Args:
        path: the ``.safetensors`` file or its folder.

    Returns:
        timm's Hugging Face style config: ``architecture``, ``num_classes``, ``model_args``,
        ``pretrained_cfg`` (input size, mean, std) and an ``spcxr`` block.
    """
    weights = _weights_file(path)
    try:
        with safetensors.safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (safetensors.SafetensorError, OSError) as err:
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from err
    if _METADATA_KEY not in metadata:
        raise ValueError(
            f"{weights}: no spcxr config in the header; load a plain timm file with "
            "timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))"
        )
    return json.loads(metadata[_METADATA_KEY])


def timm_overlay(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``pretrained_cfg_overlay`` that makes ``timm.create_model`` load a saved encoder.

    Use as ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=timm_overlay(p))``
    with ``name = read_encoder_config(p)["architecture"]``.

    Args:
        path: the ``.safetensors`` file or its folder.

    Returns:
        ``dict(file=..., num_classes=..., input_size=(C, H, W), mean=..., std=...)``.
    """
    config = read_encoder_config(path)
    cfg = config["pretrained_cfg"]
    return {
        "file": str(_weights_file(path)),
        "num_classes": config["num_classes"],
        "input_size": tuple(cfg["input_size"]),
        "mean": tuple(cfg["mean"]),
        "std": tuple(cfg["std"]),
    }


def load_encoder(
    path: str | os.PathLike[str],
    *,
    in_chans: int | None = None,
    img_size: ImageSize | None = None,
    drop_path_rate: float = 0.1,
    **timm_kwargs: Any,
) -> VisionTransformer:
    """Loads a ``save_encoder`` file as a timm ViT without a classifier (safetensors only).

    The architecture comes from the file's header. The adaptations are those timm applies in
    ``create_model(..., pretrained=True)``: another ``in_chans`` via ``adapt_input_conv``
    (``convert_in_chans``), another ``img_size`` via ``resample_abs_pos_embed`` (bicubic,
    antialiased, prefix tokens kept). Every other tensor must match: the load is strict.

    Args:
        path: the ``.safetensors`` file or a folder holding ``model.safetensors``.
        in_chans: input channels of the returned encoder; ``None`` keeps the file's.
        img_size: input size of the returned encoder; ``None`` keeps the file's.
        drop_path_rate: stochastic depth for further training (inactive in ``eval()``).
        **timm_kwargs: more ``timm.create_model`` arguments; ``num_classes=2`` adds a freshly
            initialised head (a head stored in the file is used only if its size matches).

    Raises:
        FileNotFoundError: no such file. ValueError: not safetensors, no spcxr header, or tensors
        that do not fit the recorded architecture.
    """
    weights = _weights_file(path)
    config = read_encoder_config(weights)
    # safetensors parses a flat tensor table: no code runs while reading (unlike pickle).
    state = safetensors.torch.load_file(str(weights), device="cpu")
    args = {k: v for k, v in config["model_args"].items() if k != "num_classes"}
    args.update(drop_path_rate=drop_path_rate, **timm_kwargs)
    args.setdefault("num_classes", 0)
    if in_chans is not None:
        args["in_chans"] = in_chans
    if img_size is not None:
        args["img_size"] = to_2tuple(img_size)
    overlay = _target_cfg(config["pretrained_cfg"], args["in_chans"], args["img_size"])
    overlay["num_classes"] = args["num_classes"]
    model = timm.create_model(
        config["architecture"], pretrained=False, pretrained_cfg_overlay=overlay, **args
    )
    state = _adapt_state(state, model, source_size=config["pretrained_cfg"]["input_size"][1:])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights}: tensors do not fit {config['architecture']}: {err}") from err
    return model


def _target_cfg(cfg: Mapping[str, Any], in_chans: int, img_size: ImageSize) -> dict[str, Any]:
    """The file's pretrained_cfg, re-stated for the returned model's input channels and size.

    timm's ``resolve_data_config(model=...)`` then yields the right normalisation; a mean / std
    recorded for another channel count becomes its average, as timm does in that case.
    """
    out = dict(cfg)
    out["input_size"] = (in_chans, *to_2tuple(img_size))
    for key in ("mean", "std"):
        values = list(out[key])
        if len(values) != in_chans:
            values = [sum(values) / len(values)] * in_chans
        out[key] = tuple(values)
    return out


def fit_encoder_state(
    state: Mapping[str, torch.Tensor], model: VisionTransformer, source_size: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Adapts an encoder state dict saved at ``source_size`` to ``model``: input channels
    (:func:`convert_in_chans`) and the position-embedding grid (``resample_abs_pos_embed`` with
    timm's defaults, as timm's ``checkpoint_filter_fn``: bicubic, antialiased, prefix kept)."""
    state = dict(state)
    if state[_PATCH_WEIGHT].shape[1] != model.patch_embed.proj.in_channels:
        state = convert_in_chans(state, model.patch_embed.proj.in_channels)
    patch = state[_PATCH_WEIGHT].shape[-2:]
    old_grid = [side // p for side, p in zip(source_size, patch, strict=True)]
    if "pos_embed" in state and list(model.patch_embed.grid_size) != old_grid:
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"],
            new_size=list(model.patch_embed.grid_size),
            old_size=old_grid,
            num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens,
        )
    return state


def _adapt_state(
    state: dict[str, torch.Tensor], model: VisionTransformer, source_size: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Fits a saved state dict to ``model``: input channels, position grid, classifier."""
    state = fit_encoder_state(state, model, source_size)
    head = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    saved = {k: v for k, v in state.items() if k.startswith("head.")}
    if saved.keys() != head.keys() or any(saved[k].shape != v.shape for k, v in head.items()):
        # A classifier of another size (or none): keep the model's own, freshly initialised one.
        state = {k: v for k, v in state.items() if k not in saved} | head
    return state


def map_blocks(blocks: Iterable[int], depth: int, reference_depth: int = 12) -> tuple[int, ...]:
    """Maps 1-based block numbers chosen for ``reference_depth`` onto an encoder of ``depth``.

    Block ``b`` becomes ``ceil(b * depth / reference_depth)``: the same relative position, never
    below 1, and the last block stays the last. Duplicates are merged.

    Examples:
        ``(6, 8, 10, 12)``: depth 12 -> ``(6, 8, 10, 12)``, 6 -> ``(3, 4, 5, 6)``,
        4 -> ``(2, 3, 4)``, 24 -> ``(12, 16, 20, 24)``.

    Raises:
        ValueError: empty list, a depth below 1, or a block outside ``1..reference_depth``.
    """
    blocks = tuple(blocks)
    if depth < 1 or reference_depth < 1:
        raise ValueError(f"depths must be >= 1, got {depth} and {reference_depth}")
    if not blocks:
        raise ValueError("recon_blocks is empty: choose at least one block")
    bad = [b for b in blocks if not 1 <= b <= reference_depth]
    if bad:
        raise ValueError(f"blocks {bad} are outside 1..{reference_depth} (1-based)")
    return tuple(sorted({-(-b * depth // reference_depth) for b in blocks}))
