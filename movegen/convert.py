"""Converters from LlamaGen's released checkpoints into movegen's self-describing checkpoints.

LlamaGen (FoundationVision/LlamaGen; Sun et al., "Autoregressive Model Beats Diffusion", 2024)
publishes a VQ tokenizer (``vq_ds16_c2i.pt``: VQ-16, 256 x 256 -> 16 x 16 codes of a 16,384-entry
codebook) and class-conditional GPTs over its codes (``c2i_B_256.pt``, ``c2i_L_256.pt``, ...).

* :func:`convert_llamagen_vq` writes ``DIR/tokenizer.ckpt`` of a ``VQTokenizer`` with
  ``architecture='llamagen-vq'``;
* :func:`convert_llamagen_gpt` writes ``DIR/model.ckpt`` of our ``GPT`` (``memory='none'``,
  ``prefix_rope='zero'``), whose header names the converted tokenizer and its sha256 as a code
  store would, so sampling and evaluation check that codes and tokenizer belong together.

Both are strict: every tensor of LlamaGen's state dict is used (two named ones, LlamaGen's RoPE
table ``freqs_cis`` and the VQ's codebook-usage buffer ``quantize.codebook_used``, hold no weights
and are checked and dropped), every movegen parameter gets one, and every shape is checked; any
difference is a ``ValueError`` that names the keys. LlamaGen's files are pickles that may hold an
``argparse.Namespace`` (its training arguments); they are read with ``weights_only=True`` and that
one class allow-listed, never with full unpickling.

Parameter correspondence (LlamaGen -> movegen):

=============================================  ==============================================
GPT                                            ``GPT``
=============================================  ==============================================
``tok_embeddings``                             ``tok_emb``
``cls_embedding.embedding_table`` (C+1 rows)   ``cls_emb`` (the last row is the null class)
``layers.i.attention_norm`` / ``ffn_norm``     ``blocks.i.norm1`` / ``norm2``
``layers.i.attention.wqkv`` / ``wo``           ``blocks.i.attn.qkv`` / ``proj`` (same q, k, v order)
``layers.i.feed_forward.w1``, ``w3``           ``blocks.i.mlp.w13`` = [w1; w3] (silu(w1 x) * w3 x)
``layers.i.feed_forward.w2``                   ``blocks.i.mlp.w2``
``norm``, ``output``                           ``norm``, ``head``
=============================================  ==============================================

The VQ maps stage by stage (``conv_blocks.i.res.j`` -> ``stages.i.blocks.j``, the attention
blocks' separate ``q``, ``k``, ``v`` 1x1 convs into one ``qkv``, ``quant_conv`` /
``post_quant_conv`` into the encoder / decoder); see :func:`_vq_names`.

What else was checked for logits parity and needs no switch: RMSNorm (eps 1e-5, float32), the
SwiGLU width (``int(8 d / 3)`` rounded up to a multiple of 256; LlamaGen's c2i models leave
``ffn_dim_multiplier`` unset), the 2-D RoPE layout (first half of each head's pairs by row, second
by column, frequencies ``base ** (-4 i / D)``, consecutive pairs), the null class (row C, also the
class-dropout target), dropout on the whole embedded sequence, an unbiased head. One difference
needs a switch: LlamaGen's RoPE table gives the class position cos = sin = 0, hence
``GPTConfig.prefix_rope='zero'`` on converted models.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import torch

# checkpoint builders, loaders and writers (moving to movegen.checkpoint: repoint these lines)
from .checkpoint import (
    CKPT_FORMAT_TOKENIZER,
    atomic_torch_save,
    load_checkpoint,
    model_checkpoint,
    sha256_file,
    tokenizer_checkpoint,
)
from .model import GPT, PRESETS, GPTConfig
from .tokenizer import TokenizerConfig, VQTokenizer

log = logging.getLogger(__name__)

VQ_MODELS: dict[str, str] = {"VQ-16": "llamagen-vq16", "VQ-8": "llamagen-vq8"}
"""LlamaGen's ``--vq-model`` names -> movegen tokenizer presets."""

GPT_SIZES: dict[str, dict] = {
    **{name: PRESETS[name] for name in ("B", "L", "XL")},  # movegen's presets of LlamaGen's sizes
    "XXL": dict(n_layer=48, n_head=24, n_embd=1536),
    "XXXL": dict(n_layer=48, n_head=40, n_embd=2560),
}
"""LlamaGen's class-conditional sizes GPT-B ... GPT-XXXL: depth, heads, width."""


# --------------------------------------------------------------------------- loading


def load_llamagen_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """LlamaGen's checkpoint file -> its state dict (the ``"model"`` entry, or the file itself
    when it is a bare state dict). Unpickled with ``weights_only=True``; the only class allowed
    beyond tensors and containers is ``argparse.Namespace`` (LlamaGen stores its arguments)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LlamaGen checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} cannot be loaded safely: it holds objects other than tensors, containers and "
            f"argparse.Namespace, and movegen never unpickles those ({e})"
        ) from e
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        sd = obj["model"]
    elif isinstance(obj, Mapping) and obj and all(torch.is_tensor(v) for v in obj.values()):
        sd = obj
    else:
        keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            f"{path} is not a LlamaGen checkpoint: expected a state dict or one under 'model', "
            f"found {keys}"
        )
    bad = sorted(k for k, v in sd.items() if not torch.is_tensor(v) or not v.is_floating_point())
    if bad:
        raise ValueError(f"{path}: state dict entries that are not float tensors: {bad}")
    return dict(sd)


def strict_map(
    src: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    names: Callable[[str], list[str]],
    dropped: Mapping[str, tuple[int, ...]],
    what: str,
) -> dict[str, torch.Tensor]:
    """Build ``target``'s state dict from ``src``, strictly.

    ``names(key)`` gives the source keys of one target key; several are concatenated along the
    first dimension, each an equal part of it; values are cast to the target's dtype.
    ``dropped``: source keys that hold no weights (optional, shape checked, not loaded). Raises
    ``ValueError`` listing every missing, extra or mis-shaped key."""
    out, used, problems = {}, set(), []
    for key, ref in target.items():
        parts = names(key)
        want = (ref.shape[0] // len(parts), *ref.shape[1:])
        ok = True
        for p in parts:
            if p not in src:
                problems.append(f"missing key {p!r} (for movegen's {key!r})")
                ok = False
            elif tuple(src[p].shape) != want:
                problems.append(f"key {p!r} has shape {tuple(src[p].shape)}, expected {want}")
                ok = False
        used.update(parts)
        if ok:
            t = torch.cat([src[p] for p in parts]) if len(parts) > 1 else src[parts[0]]
            out[key] = t.to(ref.dtype).contiguous().clone()
    for k in sorted(set(src) - used):
        if k not in dropped:
            problems.append(f"unexpected key {k!r}")
        elif tuple(src[k].shape) != dropped[k]:
            problems.append(f"key {k!r} has shape {tuple(src[k].shape)}, expected {dropped[k]}")
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(
            f"{what} does not match ({len(problems)} problem{'s' * (len(problems) > 1)}; "
            "check the model/size arguments):\n  " + "\n  ".join(problems[:20]) + more
        )
    return out


def _out_file(out: str | os.PathLike, name: str, overwrite: bool) -> Path:
    path = Path(out) / name
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _source(path: str | os.PathLike, model: str) -> dict:
    path = Path(path)
    return {
        "project": "LlamaGen",
        "model": model,
        "path": str(path.resolve()),
        "sha256": sha256_file(path),
    }


# --------------------------------------------------------------------------- VQ tokenizer

_RES = {"0": "norm1", "2": "conv1", "3": "norm2", "5": "conv2"}  # ResBlock.block index -> name


def _vq_names(key: str) -> list[str]:
    """LlamaGen ``VQModel`` key(s) of one ``VQTokenizer(architecture='llamagen-vq')`` key."""
    if key.startswith("encoder.quant_conv.") or key.startswith("decoder.post_quant_conv."):
        return [key.split(".", 1)[1]]
    if key.startswith("quantizer."):
        return ["quantize." + key.removeprefix("quantizer.")]
    k = re.sub(r"\.stages\.(\d+)\.blocks\.", r".conv_blocks.\1.res.", key)
    k = re.sub(r"\.stages\.(\d+)\.attn\.", r".conv_blocks.\1.attn.", k)
    side = "downsample" if k.startswith("encoder.") else "upsample"
    k = re.sub(r"\.stages\.(\d+)\.resample\.", rf".conv_blocks.\1.{side}.", k)
    k = re.sub(r"\.block\.(\d)\.", lambda m: f".{_RES[m[1]]}.", k)
    k = k.replace(".skip.", ".nin_shortcut.").replace(".proj.", ".proj_out.")
    if ".qkv." in k:
        return [k.replace(".qkv.", f".{p}.") for p in "qkv"]
    return [k]


def convert_llamagen_vq(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: Literal["VQ-16", "VQ-8"] = "VQ-16",
    codebook_size: int = 16384,
    code_dim: int = 8,
    z_channels: int = 256,
    base_channels: int = 128,
    image_size: int = 256,
    dataset: str = "imagenet",
    overwrite: bool = False,
) -> Path:
    """Convert LlamaGen's VQ tokenizer (e.g. ``vq_ds16_c2i.pt``) into ``OUT/tokenizer.ckpt``.

    Every tensor of the checkpoint's state dict is mapped onto a movegen ``VQTokenizer`` with
    ``architecture='llamagen-vq'`` and every shape checked; a missing, extra or mis-shaped key is
    a ``ValueError`` naming it. The result loads with ``movegen.checkpoint.load_tokenizer`` and encodes
    images in [-1, 1] to LlamaGen's codes.

    Args:
        checkpoint: LlamaGen's tokenizer file (its state dict under ``"model"``, or bare).
        out: folder for ``tokenizer.ckpt`` (created if needed).
        model: LlamaGen's ``--vq-model``: ``VQ-16`` (downsample 16) or ``VQ-8`` (downsample 8).
        codebook_size: LlamaGen's ``--codebook-size``.
        code_dim: LlamaGen's ``--codebook-embed-dim``.
        z_channels: LlamaGen's ``z_channels`` (the encoder's output width; 256 in its releases).
        base_channels: width of the first stage (LlamaGen's Encoder/Decoder ``ch``: 128).
        image_size: image side the tokenizer is used at (LlamaGen: 256 or 384).
        dataset: dataset name recorded as the tokenizer's own (``extract-codes`` reads its
            default from it; LlamaGen trained on ImageNet: pass ``folder:<path>`` of your copy).
        overwrite: replace an existing ``OUT/tokenizer.ckpt``.

    Returns:
        The path of the written ``tokenizer.ckpt``.
    """
    if model not in VQ_MODELS:
        raise ValueError(f"model must be one of {', '.join(VQ_MODELS)}, got {model!r}")
    path = _out_file(out, "tokenizer.ckpt", overwrite)
    cfg = TokenizerConfig.preset(
        VQ_MODELS[model],
        codebook_size=codebook_size,
        code_dim=code_dim,
        z_channels=z_channels,
        base_channels=base_channels,
        image_size=image_size,
    )
    with torch.device("meta"):  # shapes only; the weights all come from the checkpoint
        tok = VQTokenizer(cfg)
    src = load_llamagen_state_dict(checkpoint)
    dropped = {"quantize.codebook_used": (65536,)}  # a training statistic of recent codes
    sd = strict_map(
        src, tok.state_dict(), _vq_names, dropped, f"LlamaGen {model} state dict in {checkpoint}"
    )
    tok.load_state_dict(sd, strict=True, assign=True)
    info = {"name": dataset, "fit": "resize", "image_size": image_size, "native_size": image_size}
    ckpt = tokenizer_checkpoint(tok.eval(), dataset=info, metrics={})
    ckpt["converted_from"] = _source(checkpoint, model)
    atomic_torch_save(ckpt, path)
    K, d, n = cfg.codebook_size, cfg.code_dim, cfg.latent_size
    log.info("wrote %s (LlamaGen %s: %d x %d codebook, %d x %d codes)", path, model, K, d, n, n)
    return path


# --------------------------------------------------------------------------- GPT

_GPT_FIXED = {
    "tok_emb.weight": ["tok_embeddings.weight"],
    "cls_emb.weight": ["cls_embedding.embedding_table.weight"],
    "norm.weight": ["norm.weight"],
    "head.weight": ["output.weight"],
}
_GPT_LAYER = {
    "norm1.weight": ["attention_norm.weight"],
    "attn.qkv.weight": ["attention.wqkv.weight"],
    "attn.proj.weight": ["attention.wo.weight"],
    "norm2.weight": ["ffn_norm.weight"],
    "mlp.w13.weight": ["feed_forward.w1.weight", "feed_forward.w3.weight"],  # (a, b) chunks
    "mlp.w2.weight": ["feed_forward.w2.weight"],
}


def _gpt_names(key: str) -> list[str]:
    """LlamaGen ``Transformer`` key(s) of one ``GPT`` (``memory='none'``) key."""
    if key in _GPT_FIXED:
        return _GPT_FIXED[key]
    i, rest = re.fullmatch(r"blocks\.(\d+)\.(.+)", key).groups()
    return [f"layers.{i}.{p}" for p in _GPT_LAYER[rest]]


def convert_llamagen_gpt(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike,
    size: Literal["B", "L", "XL", "XXL", "XXXL"] = "B",
    num_classes: int = 1000,
    n_layer: int | None = None,
    n_head: int | None = None,
    n_embd: int | None = None,
    mlp_multiple_of: int = 256,
    overwrite: bool = False,
) -> Path:
    """Convert a LlamaGen class-conditional GPT (e.g. ``c2i_B_256.pt``) into ``OUT/model.ckpt``.

    Every tensor of the checkpoint's state dict is mapped onto a movegen ``GPT`` (``memory='none'``,
    ``prefix_rope='zero'`` as LlamaGen rotates its class position) and every shape checked; a
    missing, extra or mis-shaped key is a ``ValueError`` naming it. The codebook size and the
    token grid come from the tokenizer, whose path and sha256 go into the checkpoint's header
    (as a code store's would), so ``movegen sample`` / ``evaluate`` find and check it.

    Args:
        checkpoint: LlamaGen's GPT file (its state dict under ``"model"``, or bare).
        out: folder for ``model.ckpt`` (created if needed).
        tokenizer: the ``tokenizer.ckpt`` written by :func:`convert_llamagen_vq` for the VQ the
            GPT was trained on (its codebook size is the GPT's vocabulary, its grid the sequence).
        size: LlamaGen's model size (``GPT-B`` ... ``GPT-XXXL``): depth, heads and width.
        num_classes: classes of the class embedding (without the null class; ImageNet: 1000).
        n_layer: depth, overriding the size's (for a model trained with its own ``ModelArgs``).
        n_head: attention heads, overriding the size's.
        n_embd: width, overriding the size's.
        mlp_multiple_of: LlamaGen's ``multiple_of`` (the SwiGLU width is rounded up to it).
        overwrite: replace an existing ``OUT/model.ckpt``.

    Returns:
        The path of the written ``model.ckpt``.
    """
    if size not in GPT_SIZES:
        raise ValueError(f"size must be one of {', '.join(GPT_SIZES)}, got {size!r}")
    path = _out_file(out, "model.ckpt", overwrite)
    tck = load_checkpoint(tokenizer, CKPT_FORMAT_TOKENIZER)
    tcfg = TokenizerConfig(**tck["config"])
    h = w = tcfg.latent_size
    dims = dict(GPT_SIZES[size])
    for k, v in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd)):
        if v is not None:
            dims[k] = v
    cfg = GPTConfig(
        **dims,
        vocab_size=tcfg.codebook_size,
        num_classes=num_classes,
        seq_len=h * w,
        grid_h=h,
        mlp_multiple_of=mlp_multiple_of,
        memory="none",
        prefix_rope="zero",
    )
    model = GPT(cfg)
    src = load_llamagen_state_dict(checkpoint)
    # LlamaGen's RoPE table (cls_token_num + h*w, D/2, 2), when a checkpoint carries it
    dropped = {"freqs_cis": (1 + h * w, cfg.head_dim // 2, 2)}
    sd = strict_map(
        src,
        model.state_dict(),
        _gpt_names,
        dropped,
        f"LlamaGen GPT-{size} state dict in {checkpoint}",
    )
    model.load_state_dict(sd, strict=True)
    header = {
        "codebook_size": cfg.vocab_size,
        "num_classes": num_classes,
        "h": h,
        "w": w,
        "dataset": tck.get("dataset", {}).get("name"),
        "tokenizer_path": str(Path(tokenizer).resolve()),
        "tokenizer_sha256": sha256_file(tokenizer),
    }
    ckpt = model_checkpoint(
        model.eval(),
        header=header,
        train={"converted_from": _source(checkpoint, f"GPT-{size}")},
        metrics={},
    )
    atomic_torch_save(ckpt, path)
    log.info(
        "wrote %s (LlamaGen GPT-%s: %d layers, width %d, %d classes, %d codes)",
        path,
        size,
        cfg.n_layer,
        cfg.n_embd,
        num_classes,
        cfg.vocab_size,
    )
    return path


__all__ = ["convert_llamagen_gpt", "convert_llamagen_vq", "load_llamagen_state_dict"]
