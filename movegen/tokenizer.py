"""The VQ image tokenizer: a VQGAN-style conv encoder/decoder around a quantizer from
``vector-quantize-pytorch``, or LlamaGen's VQ tokenizer (``architecture='llamagen-vq'``).

::

    image (B, C, H, W) --Encoder--> z (B, code_dim, h, w) --quantizer--> codes (B, h, w)
                                                                          |
    image' (B, C, H, W) <--Decoder-- z_q (B, code_dim, h, w) <--lookup----+

``h = H / f`` with the downsample factor ``f = 2 ** (len(channel_mult) - 1)``.
Quantizers: ``vq`` (VectorQuantize, l2-normalised / cosine codes, EMA codebook, k-means init,
dead-code replacement), ``fsq`` (finite scalar quantisation, codebook = prod(levels)) and ``lfq``
(lookup-free, codebook = 2**bits). No Lightning here: ``movegen.lit.LitTokenizer`` trains it.

``architecture='llamagen-vq'`` is the tokenizer of LlamaGen (Sun et al., "Autoregressive Model
Beats Diffusion", 2024; their VQ-16 has a 16,384 x 8 codebook and turns 256 x 256 images into
16 x 16 codes): the taming-transformers VQGAN layout (two residual blocks per stage, single-head
self-attention at the lowest resolution and in the middle, 1x1 convs into and out of the code
space) and a plain codebook matched by distance between l2-normalised vectors. It exists so that
LlamaGen's released weights run inside movegen (``movegen.convert.convert_llamagen_vq``) behind
the same ``encode`` / ``lookup`` / ``decode`` interface::

    image --conv_in--> [stage: res x n (+ attn), down] x S --mid: res, attn, res--> norm, silu,
          conv_out (z_channels) --quant_conv 1x1--> z (code_dim) --nearest l2-normalised code-->
    codes --lookup--> z_q --post_quant_conv 1x1--> conv_in --mid--> [stage: res x (n+1)
          (+ attn), up] x S --> norm, silu, conv_out --> image'
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(kw_only=True)
class TokenizerConfig:
    """Architecture and quantizer of a VQ tokenizer."""

    architecture: Literal["movegen", "llamagen-vq"] = "movegen"
    """'movegen': the small conv encoder/decoder of this file around ``quantizer``.
    'llamagen-vq': LlamaGen's VQ tokenizer (for its converted weights, see
    ``TokenizerConfig.preset('llamagen-vq16')``); it reads ``base_channels``, ``channel_mult``,
    ``num_res_blocks``, ``z_channels``, ``code_dim``, ``codebook_size``, ``use_cosine_sim`` and
    ``commitment_weight``, needs ``quantizer='vq'``, and learns its codebook by gradient (the
    EMA, k-means, dead-code and rotation-trick options are for 'movegen' only)."""
    image_size: int = 8
    """Side of the (square) input images in pixels."""
    channels: int = 1
    """Image channels (1 for grey, 3 for RGB)."""
    base_channels: int = 64
    """Width of the first conv stage."""
    channel_mult: tuple[int, ...] = (1, 2)
    """Width multiplier per stage; each stage after the first halves the resolution."""
    num_res_blocks: int = 1
    """Residual blocks per stage."""
    code_dim: int = 32
    """Width of the latent that is quantized."""
    quantizer: Literal["vq", "fsq", "lfq"] = "vq"
    """'vq' (VectorQuantize, cosine codes), 'fsq' or 'lfq'."""
    codebook_size: int = 256
    """K for 'vq' and 'lfq' (a power of two for lfq); ignored by 'fsq' (prod(fsq_levels))."""
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    """Levels per dimension for 'fsq'."""
    use_cosine_sim: bool = True
    """'vq': l2-normalised codes and inputs (cosine distance)."""
    commitment_weight: float = 0.25
    """'vq': weight of the commitment loss inside the quantizer loss."""
    codebook_decay: float = 0.9
    """'vq': EMA decay of the codebook."""
    kmeans_init: bool = True
    """'vq': initialise the codebook with k-means on the first batch."""
    dead_code_threshold: float = 1.0
    """'vq': replace codes whose EMA cluster size drops below this (0 disables)."""
    rotation_trick: bool = True
    """'vq': gradients through the quantizer by the rotation trick (else straight-through)."""
    lfq_entropy_weight: float = 0.1
    """'lfq': entropy loss weight."""
    z_channels: int = 256
    """'llamagen-vq': width of the encoder output and decoder input, on either side of the 1x1
    convs to and from ``code_dim``."""

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.fsq_levels = tuple(self.fsq_levels)
        if self.architecture not in ("movegen", "llamagen-vq"):
            raise ValueError(
                f"architecture must be 'movegen' or 'llamagen-vq', got {self.architecture!r}"
            )
        if self.architecture == "llamagen-vq" and self.quantizer != "vq":
            raise ValueError(
                f"architecture 'llamagen-vq' has its own codebook quantizer; set quantizer='vq' "
                f"(got {self.quantizer!r})"
            )
        if self.quantizer not in ("vq", "fsq", "lfq"):
            raise ValueError(f"quantizer must be 'vq', 'fsq' or 'lfq', got {self.quantizer!r}")
        if self.image_size % self.downsample:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by the downsample factor {self.downsample} "
                f"(channel_mult has {len(self.channel_mult)} stages)"
            )
        if (
            self.quantizer == "lfq"
            and 2 ** int(math.log2(self.codebook_size)) != self.codebook_size
        ):
            raise ValueError(f"lfq needs a power-of-two codebook_size, got {self.codebook_size}")
        defaults = {f.name: f.default for f in fields(self)}
        if self.quantizer == "fsq":
            K = math.prod(self.fsq_levels)
            if self.codebook_size not in (defaults["codebook_size"], K):
                warnings.warn(f"quantizer 'fsq' has prod(fsq_levels) = {K} codes; codebook_size "
                              f"{self.codebook_size} is ignored (set fsq_levels instead)", stacklevel=3)  # fmt: skip
            self.codebook_size = K
        elif self.fsq_levels != defaults["fsq_levels"]:
            warnings.warn(f"fsq_levels {self.fsq_levels} are used only by quantizer 'fsq' (this one is "
                          f"{self.quantizer!r}); they are ignored", stacklevel=3)  # fmt: skip

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def preset(cls, name: str, **overrides) -> TokenizerConfig:
        """A named architecture (``llamagen-vq16``, ``llamagen-vq8``) with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _norm(ch: int) -> nn.GroupNorm:
    groups = math.gcd(32, ch)
    return nn.GroupNorm(groups, ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.Sequential(
            _norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
            _norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1),
        )  # fmt: skip
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        chs = [cfg.base_channels * m for m in cfg.channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(cfg.channels, chs[0], 3, padding=1)]
        cin = chs[0]
        for i, ch in enumerate(chs):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin, ch))
                cin = ch
            if i < len(chs) - 1:
                layers.append(nn.Conv2d(cin, cin, 4, stride=2, padding=1))
        layers += [ResBlock(cin, cin), _norm(cin), nn.SiLU(), nn.Conv2d(cin, cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        chs = [cfg.base_channels * m for m in cfg.channel_mult][::-1]
        cin = chs[0]
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, cin, 3, padding=1), ResBlock(cin, cin)]
        for i, ch in enumerate(chs):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin, ch))
                cin = ch
            if i < len(chs) - 1:
                layers += [
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(cin, cin, 3, padding=1),
                ]
        layers += [_norm(cin), nn.SiLU(), nn.Conv2d(cin, cfg.channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Quantizer(nn.Module):
    """One interface over the three quantizers: ``forward(z (B, N, d)) -> (z_q, codes (B, N), loss)``
    and ``lookup(codes) -> z_q``."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize

        self.kind = cfg.quantizer
        if self.kind == "vq":
            self.q = VectorQuantize(
                dim=cfg.code_dim,
                codebook_size=cfg.codebook_size,
                use_cosine_sim=cfg.use_cosine_sim,
                commitment_weight=cfg.commitment_weight,
                decay=cfg.codebook_decay,
                kmeans_init=cfg.kmeans_init,
                threshold_ema_dead_code=cfg.dead_code_threshold,
                rotation_trick=cfg.rotation_trick,
                straight_through=not cfg.rotation_trick,
            )
        elif self.kind == "fsq":
            self.q = FSQ(levels=list(cfg.fsq_levels), dim=cfg.code_dim)
        else:
            self.q = LFQ(
                dim=cfg.code_dim,
                codebook_size=cfg.codebook_size,
                entropy_loss_weight=cfg.lfq_entropy_weight,
            )

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.kind == "fsq":
            zq, codes = self.q(z)
            return zq, codes, z.new_zeros(())
        zq, codes, loss = self.q(z)
        return zq, codes, loss.sum() if loss.numel() > 1 else loss.reshape(())

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        if self.kind == "vq":
            return self.q.get_output_from_indices(codes)
        return self.q.indices_to_codes(codes)


# --------------------------------------------------------------------------- LlamaGen's VQ


class SpatialAttention(nn.Module):
    """Single-head self-attention over the ``h * w`` positions of a feature map, residual."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2)  # (B, H*W, 3C)
        q, k, v = qkv[:, None].chunk(3, dim=-1)  # each (B, 1, H*W, C): one head of width C
        y = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, H*W, C)
        return x + self.proj(y.transpose(1, 2).reshape(B, C, H, W))


class Resample(nn.Module):
    """Halve the resolution (a 3x3 stride-2 conv after padding right and bottom by one) or double
    it (nearest neighbours, then a 3x3 conv)."""

    def __init__(self, ch: int, up: bool):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(ch, ch, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Stage(nn.Module):
    """Residual blocks at one resolution, each optionally followed by attention, then an
    optional resampling."""

    def __init__(
        self, cin: int, cout: int, blocks: int, attention: bool, resample: Resample | None
    ):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(cin if i == 0 else cout, cout) for i in range(blocks))
        self.attn = nn.ModuleList(SpatialAttention(cout) for _ in range(blocks if attention else 0))
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        return self.resample(x)


def _mid(ch: int) -> nn.Sequential:
    return nn.Sequential(ResBlock(ch, ch), SpatialAttention(ch), ResBlock(ch, ch))


class LlamaGenEncoder(nn.Module):
    """``images (B, C, H, W) -> z (B, code_dim, H/f, W/f)``: stages from ``base_channels`` up,
    attention in the last (lowest-resolution) stage and the middle, ``quant_conv`` to code_dim."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        chs = [cfg.base_channels * m for m in cfg.channel_mult]
        n = len(chs)
        self.conv_in = nn.Conv2d(cfg.channels, cfg.base_channels, 3, padding=1)
        self.stages = nn.ModuleList()
        cin = cfg.base_channels
        for i, ch in enumerate(chs):
            down = Resample(ch, up=False) if i < n - 1 else None
            self.stages.append(
                Stage(cin, ch, cfg.num_res_blocks, attention=i == n - 1, resample=down)
            )
            cin = ch
        self.mid = _mid(chs[-1])
        self.norm_out = _norm(chs[-1])
        self.conv_out = nn.Conv2d(chs[-1], cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.code_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for stage in self.stages:
            x = stage(x)
        x = self.conv_out(F.silu(self.norm_out(self.mid(x))))
        return self.quant_conv(x)


class LlamaGenDecoder(nn.Module):
    """``z_q (B, code_dim, h, w) -> images (B, C, h*f, w*f)`` (not clamped): ``post_quant_conv``,
    the middle, then stages from the lowest resolution up, one residual block more per stage than
    the encoder, attention in the first stage."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        chs = [cfg.base_channels * m for m in cfg.channel_mult][::-1]  # lowest resolution first
        n = len(chs)
        self.post_quant_conv = nn.Conv2d(cfg.code_dim, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, chs[0], 3, padding=1)
        self.mid = _mid(chs[0])
        self.stages = nn.ModuleList()
        cin = chs[0]
        for i, ch in enumerate(chs):
            up = Resample(ch, up=True) if i < n - 1 else None
            self.stages.append(
                Stage(cin, ch, cfg.num_res_blocks + 1, attention=i == 0, resample=up)
            )
            cin = ch
        self.norm_out = _norm(chs[-1])
        self.conv_out = nn.Conv2d(chs[-1], cfg.channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(self.post_quant_conv(z)))
        for stage in self.stages:
            x = stage(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class NormalizedCodebook(nn.Module):
    """LlamaGen's quantizer, with :class:`Quantizer`'s interface: a plain table of codes learned
    by gradient; with ``use_cosine_sim`` latents and codes are l2-normalised before the nearest
    code is taken (so the code vectors are unit vectors). Loss: codebook term plus
    ``commitment_weight`` times the commitment term; straight-through gradients."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.l2, self.beta = cfg.use_cosine_sim, cfg.commitment_weight
        K = cfg.codebook_size
        self.embedding = nn.Embedding(K, cfg.code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / K, 1.0 / K)

    def codebook(self) -> torch.Tensor:
        """The code vectors ``(K, d)`` as the quantizer uses them."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2 else w

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z (B, N, d) -> (z_q (B, N, d), codes (B, N), loss ())``."""
        if self.l2:
            z = F.normalize(z, dim=-1)
        e = self.codebook()
        e2 = e.pow(2).sum(1)
        # squared distances |z|^2 + |e|^2 - 2 z.e written out as LlamaGen computes them, so that
        # near-ties resolve the same way; in row chunks to bound the (rows, K) matrix
        rows = z.reshape(-1, z.shape[-1]).split(4096)
        codes = torch.cat(
            [(r.pow(2).sum(1, keepdim=True) + e2 - 2 * r @ e.t()).argmin(1) for r in rows]
        )
        codes = codes.view(z.shape[:-1])
        zq = e[codes]
        loss = (zq - z.detach()).pow(2).mean() + self.beta * (zq.detach() - z).pow(2).mean()
        return z + (zq - z).detach(), codes, loss

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes (B, N) -> z_q (B, N, d)``."""
        return self.codebook()[codes]


class VQTokenizer(nn.Module):
    """Images in [-1, 1] to discrete codes and back.

    >>> tok = VQTokenizer(TokenizerConfig(image_size=8, channel_mult=(1, 2), codebook_size=64))
    >>> codes = tok.encode(torch.rand(4, 1, 8, 8) * 2 - 1)   # (4, 4, 4) int64 in [0, 64)
    >>> images = tok.decode(codes)                           # (4, 1, 8, 8) in [-1, 1]
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        if config.architecture == "llamagen-vq":
            self.encoder = LlamaGenEncoder(config)
            self.quantizer = NormalizedCodebook(config)
            self.decoder = LlamaGenDecoder(config)
        else:
            self.encoder = Encoder(config)
            self.quantizer = Quantizer(config)
            self.decoder = Decoder(config)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def _check(self, images: torch.Tensor) -> None:
        c, s = self.config.channels, self.config.image_size
        if images.ndim != 4 or images.shape[1:] != (c, s, s):
            raise ValueError(f"expected images (B, {c}, {s}, {s}), got {tuple(images.shape)}")

    def quantize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``images (B, C, H, W) -> (z_q (B, d, h, w), codes (B, h, w), quantizer loss ())``."""
        self._check(images)
        z = self.encoder(images)
        B, d, h, w = z.shape
        # vector-quantize-pytorch's image-fmap path is fragile; flatten to (B, h*w, d) ourselves
        zq, codes, loss = self.quantizer(z.flatten(2).transpose(1, 2).float())
        zq = zq.transpose(1, 2).reshape(B, d, h, w)
        return zq, codes.reshape(B, h, w).long(), loss

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``images -> (reconstruction (B, C, H, W), codes (B, h, w), quantizer loss ())``."""
        zq, codes, loss = self.quantize(images)
        return self.decoder(zq), codes, loss

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, C, H, W) in [-1, 1] -> codes (B, h, w)`` int64."""
        was = self.training
        self.eval()
        try:
            return self.quantize(images)[1]
        finally:
            self.train(was)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes (B, h, w) -> z_q (B, d, h, w)``."""
        B, h, w = codes.shape
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]"
            )
        zq = self.quantizer.lookup(codes.reshape(B, h * w).long())
        return zq.transpose(1, 2).reshape(B, -1, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes (B, h, w) -> images (B, C, H, W)`` clamped to [-1, 1]."""
        return self.decoder(self.lookup(codes)).clamp(-1, 1)


class CompiledDecode:
    """``tok.decode`` with the decoder compiled by inductor in channels-last layout, for codes
    of up to ``batch_size`` images at a time: a smaller batch is padded to it (repeating its
    first image's codes) and cut back, so one compilation serves a whole evaluation. Same
    arithmetic as ``tok.decode`` (fp32; inductor fuses the norms and activations around cuDNN's
    convolutions): on an H100 at batch 256, LlamaGen's VQ-16 (random weights) decoded 656
    images/s against the eager decoder's 349, and both differ from strict fp32 (TF32 off) in
    9.20% of their uint8 pixel values, TF32's share (``benchmarks/vq_decode.py``; the
    compilation, once per process and shape, not included). Holds a copy of ``tok.decoder``
    in channels-last layout (later changes to ``tok``'s weights do not reach it); each one
    compiles anew, and dynamo recompiles only a few times per process before it runs the
    decoder eagerly, so ``evaluate`` keeps one per tokenizer file
    (``evaluate.compiled_decoder``)."""

    def __init__(self, tok: VQTokenizer, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tok, self.batch_size = tok, batch_size
        # a copy: the caller's decoder keeps its layout (and its eager decode its arithmetic)
        dec = copy.deepcopy(tok.decoder).to(memory_format=torch.channels_last)
        self.decoder = torch.compile(dec, dynamic=False)

    @torch.no_grad()
    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes (B, h, w) -> images (B, C, H, W)`` clamped to [-1, 1], ``B <= batch_size``."""
        n = len(codes)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"this CompiledDecode takes 1 to {self.batch_size} images' codes at a time, "
                             f"got {n}: split them, or make one with a larger batch_size")  # fmt: skip
        if n < self.batch_size:
            codes = torch.cat([codes, codes[:1].expand(self.batch_size - n, *codes.shape[1:])])
        z = self.tok.lookup(codes).contiguous(memory_format=torch.channels_last)
        return self.decoder(z)[:n].clamp(-1, 1).contiguous()


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean PSNR in dB of images in [-1, 1] (peak-to-peak 2), per image then averaged."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(4.0 / mse)).mean()


# --------------------------------------------------------------------------- adversarial / perceptual


class PatchDiscriminator(nn.Module):
    """A small PatchGAN discriminator (hinge loss)."""

    def __init__(self, channels: int, width: int = 64, layers: int = 2):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2)]
        ch = width
        for _ in range(layers):
            mods += [
                nn.Conv2d(ch, ch * 2, 4, stride=2, padding=1),
                _norm(ch * 2),
                nn.LeakyReLU(0.2),
            ]
            ch *= 2
        mods.append(nn.Conv2d(ch, 1, 3, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


VGG_WEIGHTS = "vgg16-397923af.pth"


class VGGPerceptual(nn.Module):
    """Feature-space L2 distance on torchvision VGG16 features (local weights only)."""

    def __init__(self, weights_path: str):
        super().__init__()
        import torchvision

        vgg = torchvision.models.vgg16()
        vgg.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        self.features = vgg.features[:23].eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.taps = (3, 8, 15, 22)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def feats(t):
            t = t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t
            t = ((t + 1) / 2 - self.mean) / self.std
            t = F.interpolate(t, size=max(32, t.shape[-1]), mode="bilinear")
            out = []
            for i, layer in enumerate(self.features):
                t = layer(t)
                if i in self.taps:
                    out.append(F.normalize(t, dim=1))
            return out

        return sum((a - b).pow(2).mean() for a, b in zip(feats(x), feats(y)))


def find_vgg_weights() -> str | None:
    import os

    hub = os.path.join(torch.hub.get_dir(), "checkpoints", VGG_WEIGHTS)
    return hub if os.path.exists(hub) else None


_LLAMAGEN_VQ16 = dict(
    architecture="llamagen-vq",
    image_size=256,
    channels=3,
    base_channels=128,
    channel_mult=(1, 1, 2, 2, 4),
    num_res_blocks=2,
    z_channels=256,
    code_dim=8,
    codebook_size=16384,
)
PRESETS: dict[str, dict] = {
    # LlamaGen's released tokenizers (vq_ds16_c2i.pt, vq_ds8_c2i.pt), for converted weights
    "llamagen-vq16": _LLAMAGEN_VQ16,
    "llamagen-vq8": {**_LLAMAGEN_VQ16, "channel_mult": (1, 2, 2, 4)},
}

__all__ = ["CompiledDecode", "PatchDiscriminator", "TokenizerConfig", "VQTokenizer", "psnr"]
