"""The VQ image tokenizer: a VQGAN-style conv encoder/decoder around a quantizer from
``vector-quantize-pytorch``.

::

    image (B, C, H, W) --Encoder--> z (B, code_dim, h, w) --quantizer--> codes (B, h, w)
                                                                          |
    image' (B, C, H, W) <--Decoder-- z_q (B, code_dim, h, w) <--lookup----+

``h = H / f`` with the downsample factor ``f = 2 ** (len(channel_mult) - 1)``.
Quantizers: ``vq`` (VectorQuantize, l2-normalised / cosine codes, EMA codebook, k-means init,
dead-code replacement), ``fsq`` (finite scalar quantisation, codebook = prod(levels)) and ``lfq``
(lookup-free, codebook = 2**bits). No Lightning here: ``movegen.lit.LitTokenizer`` trains it.
"""

from __future__ import annotations

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

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.fsq_levels = tuple(self.fsq_levels)
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


class VQTokenizer(nn.Module):
    """Images in [-1, 1] to discrete codes and back.

    >>> tok = VQTokenizer(TokenizerConfig(image_size=8, channel_mult=(1, 2), codebook_size=64))
    >>> codes = tok.encode(torch.rand(4, 1, 8, 8) * 2 - 1)   # (4, 4, 4) int64 in [0, 64)
    >>> images = tok.decode(codes)                           # (4, 1, 8, 8) in [-1, 1]
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
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


__all__ = ["PatchDiscriminator", "TokenizerConfig", "VQTokenizer", "psnr"]
