"""LightningModules and DataModules: the tokenizer, the AR model and the evaluation classifier.

The model files (``tokenizer.py``, ``model.py``, ``move.py``) know nothing of Lightning; this file
wraps them with losses, optimisers, schedules and logging.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .data import CodeStore, load_dataset, split_holdout
from .tokenizer import (
    PatchDiscriminator,
    TokenizerConfig,
    VGGPerceptual,
    VQTokenizer,
    find_vgg_weights,
    psnr,
)

log = logging.getLogger(__name__)

CKPT_FORMAT_TOKENIZER = "movegen.tokenizer/1"
CKPT_FORMAT_MODEL = "movegen.model/1"
CKPT_FORMAT_CLASSIFIER = "movegen.classifier/1"


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("movegen")
    except PackageNotFoundError:
        return "0+unknown"


def schedule_length(trainer) -> int:
    """Steps the LR schedule spans: ``max_steps``, else Lightning's estimate from the epochs."""
    if trainer is None:
        return 10_000
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps
    return int(trainer.estimated_stepping_batches)


def warmup_cosine(
    step: int, *, warmup: int, total: int, min_ratio: float = 0.1, schedule: str = "cosine"
) -> float:
    """LR multiplier: linear warm-up, then cosine decay to ``min_ratio`` (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


# =========================================================================== images


class ImageDataModule(L.LightningDataModule):
    """A named image dataset (see ``movegen.data``) as train/val loaders."""

    def __init__(
        self,
        name: str = "digits",
        data_root: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        fit: str = "pad",
        image_size: int | None = None,
        channels: int | None = None,
    ):
        """
        Args:
            name: dataset name: digits, fashion-mnist, mnist, cifar10 or folder:<path>.
            data_root: where torchvision datasets live (or the idx files of (fashion-)mnist).
            batch_size: images per batch.
            num_workers: DataLoader workers.
            fit: how images reach the tokenizer's size: 'pad' (with background) or 'resize'.
            image_size: image side; defaults to the tokenizer's image_size.
            channels: image channels; defaults to the tokenizer's.
        """
        super().__init__()
        self.name, self.data_root, self.batch_size = name, data_root, batch_size
        self.num_workers, self.fit, self.image_size, self.channels = (
            num_workers,
            fit,
            image_size,
            channels,
        )

    def dataset(self, split: str):
        return load_dataset(self.name, split, data_root=self.data_root, image_size=self.image_size,
                            fit=self.fit, channels=self.channels)  # fmt: skip

    def setup(self, stage: str | None = None):
        if not hasattr(self, "train_set"):
            self.train_set = self.dataset("train")
            self.val_set = self.dataset("val")

    def _loader(self, ds, shuffle: bool):
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          drop_last=shuffle and len(ds) > self.batch_size, persistent_workers=self.num_workers > 0)  # fmt: skip

    def train_dataloader(self):
        return self._loader(self.train_set, True)

    def val_dataloader(self):
        return self._loader(self.val_set, False)


# =========================================================================== tokenizer


class LitTokenizer(L.LightningModule):
    """Trains a :class:`VQTokenizer`: reconstruction + quantizer loss, optional PatchGAN hinge
    loss from ``disc_start`` on, optional perceptual loss (local VGG16 weights only)."""

    def __init__(
        self,
        config: TokenizerConfig,
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        rec_loss: str = "l1",
        quantizer_weight: float = 1.0,
        disc_weight: float = 0.0,
        disc_start: int = 0,
        perceptual_weight: float = 0.0,
    ):
        """
        Args:
            config: tokenizer architecture and quantizer.
            lr: peak learning rate (Adam).
            betas: Adam betas.
            weight_decay: AdamW weight decay.
            warmup_steps: linear warm-up steps, then cosine decay to min_lr_ratio * lr.
            min_lr_ratio: final LR as a fraction of lr.
            rec_loss: 'l1' or 'l2' reconstruction loss.
            quantizer_weight: weight of the quantizer's own loss (commitment / entropy).
            disc_weight: weight of the PatchGAN generator loss (0 disables the discriminator).
            disc_start: Lightning global step at which the adversarial loss switches on (with the
                discriminator on, each batch makes two optimizer steps and counts twice).
            perceptual_weight: weight of the VGG perceptual loss; needs vgg16 weights in
                $TORCH_HOME/hub/checkpoints (an error says so when they are absent).
        """
        super().__init__()
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        self.save_hyperparameters(ignore=["config"])
        self.config = config
        self.tokenizer = VQTokenizer(config)
        self.automatic_optimization = False
        self.disc = PatchDiscriminator(config.channels) if disc_weight > 0 else None
        self.perceptual = None
        if perceptual_weight > 0:
            path = find_vgg_weights()
            if path is None:
                raise FileNotFoundError(
                    "perceptual_weight > 0 needs torchvision's VGG16 weights at "
                    f"{Path(torch.hub.get_dir()) / 'checkpoints' / 'vgg16-397923af.pth'}; put the file there "
                    "or set model.perceptual_weight: 0"
                )
            self.perceptual = VGGPerceptual(path)
        self._val: dict[str, list] = {}
        self.content = None  # set by the CLI: crops padding before PSNR

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.tokenizer.parameters(), lr=self.hparams.lr, betas=self.hparams.betas,
                                weight_decay=self.hparams.weight_decay)  # fmt: skip
        total = schedule_length(self.trainer)
        f = lambda s: warmup_cosine(
            s, warmup=self.hparams.warmup_steps, total=total, min_ratio=self.hparams.min_lr_ratio
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
        if self.disc is None:
            return [opt], [sched]
        dopt = torch.optim.AdamW(
            self.disc.parameters(), lr=self.hparams.lr, betas=self.hparams.betas
        )
        return [opt, dopt], [sched]

    def _rec(self, x, y):
        return F.l1_loss(x, y) if self.hparams.rec_loss == "l1" else F.mse_loss(x, y)

    def training_step(self, batch, batch_idx):
        x, _ = batch[:2]
        opts = self.optimizers()
        opt, dopt = (opts if isinstance(opts, list) else [opts, None])[:2]
        sched = self.lr_schedulers()
        recon, codes, qloss = self.tokenizer(x)
        rec = self._rec(recon, x)
        loss = rec + self.hparams.quantizer_weight * qloss
        if self.perceptual is not None:
            loss = loss + self.hparams.perceptual_weight * self.perceptual(recon, x)
        adv_on = self.disc is not None and self.global_step >= self.hparams.disc_start
        if adv_on:
            g_loss = -self.disc(recon).mean()
            loss = loss + self.hparams.disc_weight * g_loss
            self.log("train/g_loss", g_loss)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
        opt.step()
        sched.step()
        if adv_on:
            d_real = self.disc(x.detach())
            d_fake = self.disc(recon.detach())
            d_loss = 0.5 * (F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean())
            dopt.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            dopt.step()
            self.log("train/d_loss", d_loss)
        self.log_dict({"train/loss": loss, "train/rec_loss": rec, "train/q_loss": qloss,
                       "train/psnr": psnr(recon.detach(), x)}, prog_bar=True)  # fmt: skip

    def validation_step(self, batch, batch_idx):
        x, _ = batch[:2]
        stats = tokenizer_batch_stats(self.tokenizer, x, self.content)
        for k, v in stats.items():
            self._val.setdefault(k, []).append(v)

    def on_validation_epoch_end(self):
        if not self._val:
            return
        m = reduce_tokenizer_stats(self._val, self.config.codebook_size)
        self._val = {}
        self.log_dict({f"val/{k}": v for k, v in m.items()}, prog_bar=True)


@torch.no_grad()
def tokenizer_batch_stats(tok: VQTokenizer, x: torch.Tensor, content=None) -> dict:
    was = tok.training
    tok.eval()
    zq, codes, _ = tok.quantize(x)
    recon = tok.decoder(zq).clamp(-1, 1)
    tok.train(was)
    a, b = (content(recon), content(x)) if content else (recon, x)
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return {"psnr_sum": (10 * torch.log10(4.0 / mse)).sum().item(), "n": len(x),
            "hist": torch.bincount(codes.flatten().cpu(), minlength=tok.codebook_size)}  # fmt: skip


def reduce_tokenizer_stats(stats: dict, K: int) -> dict[str, float]:
    hist = torch.stack(stats["hist"]).sum(0).double()
    p = hist / hist.sum()
    ent = -(p[p > 0] * p[p > 0].log()).sum()
    return {"psnr": sum(stats["psnr_sum"]) / sum(stats["n"]),
            "codebook_usage": (hist > 0).double().mean().item(), "perplexity": ent.exp().item()}  # fmt: skip


@torch.no_grad()
def evaluate_tokenizer(
    tok: VQTokenizer, dataset, batch_size: int = 512, device="cpu"
) -> dict[str, float]:
    """PSNR (over the dataset's original pixels), codebook usage and perplexity on a split."""
    stats: dict[str, list] = {}
    content = getattr(dataset, "content", None)
    for x, _ in DataLoader(dataset, batch_size=batch_size):
        for k, v in tokenizer_batch_stats(tok, x.to(device), content).items():
            stats.setdefault(k, []).append(v)
    return reduce_tokenizer_stats(stats, tok.codebook_size)


def tokenizer_checkpoint(tok: VQTokenizer, *, dataset: dict, metrics: dict) -> dict:
    return {
        "format": CKPT_FORMAT_TOKENIZER,
        "movegen_version": package_version(),
        "config": tok.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in tok.state_dict().items()},
        "dataset": dataset,
        "metrics": metrics,
    }


def load_checkpoint(path: str | Path, expected_format: str) -> dict:
    """Load a movegen checkpoint strictly (``weights_only=True``) and check what it is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} is not a movegen checkpoint (could not load it safely: {type(e).__name__}: {e})"
        ) from e
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt != expected_format:
        raise ValueError(
            f"{path} is not a {expected_format.split('/')[0]} checkpoint (format {fmt!r}); "
            f"pass the file written by the matching movegen command"
        )
    return ckpt


def load_tokenizer(path: str | Path, device="cpu") -> tuple[VQTokenizer, dict]:
    """A trained tokenizer from ``tokenizer.ckpt`` (strict), in eval mode, and its checkpoint dict."""
    ckpt = load_checkpoint(path, CKPT_FORMAT_TOKENIZER)
    tok = VQTokenizer(TokenizerConfig(**ckpt["config"]))
    tok.load_state_dict(ckpt["state_dict"], strict=True)
    return tok.to(device).eval(), ckpt


# =========================================================================== AR model

from torch.utils.data import Dataset  # noqa: E402

from .model import GPT, GPTConfig  # noqa: E402


class FlatViews(Dataset):
    """Every (item, view) pair of a code store as one index: ``i -> (codes[i // V, i % V], label)``.
    A seeded sampler over this set picks a random view per sample deterministically."""

    def __init__(self, store: CodeStore, indices: np.ndarray, views: int | None = None):
        self.store, self.indices = store, np.asarray(indices)
        self.views = store.views if views is None else views

    def __len__(self) -> int:
        return len(self.indices) * self.views

    def __getitem__(self, i: int):
        j, v = int(self.indices[i // self.views]), i % self.views
        return torch.from_numpy(self.store.codes[j, v].astype(np.int64)), int(self.store.labels[j])


class ViewSampler(torch.utils.data.Sampler):
    """Each epoch: every item once, in a seeded random order, each with a random view; yields
    :class:`FlatViews` indices ``item * views + view``. The same seed gives the same order for
    every arm (model init does not touch this generator)."""

    def __init__(self, n_items: int, views: int, seed: int = 0):
        self.n, self.views, self.seed, self.epoch = n_items, views, seed, 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1  # a fresh order next time even if nobody calls set_epoch
        order = torch.randperm(self.n, generator=g)
        view = torch.randint(self.views, (self.n,), generator=g)
        return iter((order * self.views + view).tolist())


class CodeDataModule(L.LightningDataModule):
    """A code store as training data (a random view per sample) and held-out validation codes
    (view 0): either a separate store (``val_codes``) or a seeded fraction of the training store."""

    def __init__(
        self,
        codes: str = "",
        val_codes: str | None = None,
        val_fraction: float = 0.05,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """
        Args:
            codes: code store of the training split (``movegen extract-codes``).
            val_codes: code store of held-out codes; default: hold out ``val_fraction`` of ``codes``.
            val_fraction: fraction held out when ``val_codes`` is not given.
            batch_size: sequences per batch (per device).
            num_workers: DataLoader workers.
            seed: seed of the held-out split and of the data order (the same for every arm).
        """
        super().__init__()
        self.codes, self.val_codes, self.val_fraction = codes, val_codes, val_fraction
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.store: CodeStore | None = None

    def prepare(self) -> None:
        if self.store is not None:
            return
        if not self.codes:
            raise ValueError(
                "no code store given: pass --codes CODES (from `movegen extract-codes`)"
            )
        self.store = CodeStore(self.codes)
        if self.val_codes:
            self.val_store = CodeStore(self.val_codes)
            for key in ("codebook_size", "h", "w", "tokenizer_sha256"):
                if self.val_store.header.get(key) != self.store.header.get(key):
                    raise ValueError(f"val_codes {self.val_codes} differs from codes in {key!r}: "
                                     f"{self.val_store.header.get(key)} vs {self.store.header.get(key)}")  # fmt: skip
            self.train_idx, self.val_idx = (
                np.arange(len(self.store)),
                np.arange(len(self.val_store)),
            )
        else:
            self.val_store = self.store
            self.train_idx, self.val_idx = split_holdout(
                len(self.store), self.val_fraction, self.seed
            )

    def check(self, cfg: GPTConfig) -> None:
        """A clear error before training when the store does not fit the model config."""
        self.prepare()
        s = self.store
        problems = []
        if s.codebook_size != cfg.vocab_size:
            problems.append(
                f"codebook size {s.codebook_size} (store) vs vocab_size {cfg.vocab_size} (model)"
            )
        if s.num_classes != cfg.num_classes:
            problems.append(
                f"{s.num_classes} classes (store) vs num_classes {cfg.num_classes} (model)"
            )
        if s.seq_len != cfg.seq_len:
            problems.append(
                f"{s.seq_len} tokens per image (store) vs seq_len {cfg.seq_len} (model)"
            )
        if problems:
            raise ValueError(f"code store {self.codes} does not match the model config: " + "; ".join(problems)
                             + ". Use a config made for this tokenizer or override --model.config.*")  # fmt: skip

    def setup(self, stage: str | None = None):
        self.prepare()

    def train_dataloader(self):
        ds = FlatViews(self.store, self.train_idx)
        sampler = ViewSampler(len(self.train_idx), self.store.views, self.seed)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)  # fmt: skip

    def val_dataloader(self):
        ds = FlatViews(self.val_store, self.val_idx, views=1)
        return DataLoader(
            ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: never on norms, embeddings, the MoVE bank or LaVE tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_table = name.startswith(("tok_emb", "cls_emb", "bank")) or ".table." in name
        (decay if p.ndim == 2 and not is_table else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class LitGPT(L.LightningModule):
    """Trains :class:`GPT` with cross-entropy on codes; logs validation loss, bits per token,
    token accuracy and tokens/s."""

    def __init__(
        self,
        config: GPTConfig,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        schedule: str = "cosine",
        min_lr_ratio: float = 0.1,
        ema_decay: float = 0.0,
        compile: bool = False,
    ):
        """
        Args:
            config: model size, vocabulary and value memory.
            lr: peak learning rate (AdamW).
            weight_decay: on matrices only (never norms, embeddings, bank, LaVE tables).
            betas: AdamW betas.
            warmup_steps: linear warm-up steps.
            schedule: 'cosine' (to min_lr_ratio * lr at max_steps) or 'constant' after warm-up.
            min_lr_ratio: final LR fraction for the cosine schedule.
            ema_decay: keep an EMA of the weights with this decay (0 disables); validation and the
                saved checkpoint then use the EMA weights.
            compile: run the training forward through torch.compile.
        """
        super().__init__()
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
        self.save_hyperparameters(ignore=["config"])
        self.config = config
        self.model = GPT(config)
        self.ema = None
        if ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
            self.ema.requires_grad_(False)
        self._fwd = None
        self._t_last = None
        self.train_tokens = 0

    def loss_fn(self):
        """Cross-entropy of the model on ``(codes, labels)``; compiled as one graph (forward and
        loss, so the fp32 logits are never materialised) when ``compile``."""
        if self._fwd is None:
            model = self.model

            def loss(codes, labels):
                logits = model(codes, labels)
                return F.cross_entropy(logits.flatten(0, 1), codes.flatten())

            self._fwd = torch.compile(loss) if self.hparams.compile else loss
        return self._fwd

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer (it assumes an
        # fp16 grad scaler). bf16 has no scaler, so clipping the gradients directly is exact.
        if not gradient_clip_val:
            return
        if str(self.trainer.precision).startswith("16"):  # fp16: let Lightning unscale first
            return self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"only norm clipping is supported, got {gradient_clip_algorithm!r}")
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), gradient_clip_val, foreach=True)

    def configure_optimizers(self):
        # fused AdamW on GPU, except under fp16 loss scaling (its gradients must be unscaled first)
        fp16 = self.trainer is not None and str(self.trainer.precision).startswith("16")
        fused = self.device.type == "cuda" and not fp16
        opt = torch.optim.AdamW(optimizer_groups(self.model, self.hparams.weight_decay), lr=self.hparams.lr,
                                betas=self.hparams.betas, fused=fused)  # fmt: skip
        total = schedule_length(self.trainer)
        f = lambda s: warmup_cosine(s, warmup=self.hparams.warmup_steps, total=total,
                                    min_ratio=self.hparams.min_lr_ratio, schedule=self.hparams.schedule)  # fmt: skip
        sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def training_step(self, batch, batch_idx):
        codes, labels = batch
        loss = self.loss_fn()(codes, labels)
        n = codes.numel() * self.trainer.world_size
        self.train_tokens += n
        now = time.perf_counter()
        if self._t_last is not None:
            self.log("train/tokens_per_s", n / max(now - self._t_last, 1e-9))
        self._t_last = now
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def eval_model(self) -> GPT:
        return self.ema.module if self.ema is not None else self.model

    def validation_step(self, batch, batch_idx):
        codes, labels = batch
        logits = self.eval_model()(codes, labels)
        loss = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
        acc = (logits.argmax(-1) == codes).float().mean()
        self.log_dict({"val/loss": loss, "val/bits_per_token": loss / math.log(2), "val/acc": acc},
                      prog_bar=True, sync_dist=True, batch_size=len(codes))  # fmt: skip

    def on_save_checkpoint(self, checkpoint):
        checkpoint["train_tokens"] = self.train_tokens

    def on_load_checkpoint(self, checkpoint):
        self.train_tokens = checkpoint.get("train_tokens", 0)


def model_checkpoint(model: GPT, *, header: dict, train: dict, metrics: dict) -> dict:
    """The self-describing ``model.ckpt``: config, code-store header (tokenizer path and hash),
    training facts, metrics, package version."""
    return {
        "format": CKPT_FORMAT_MODEL,
        "movegen_version": package_version(),
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "code_store": header,
        "train": train,
        "metrics": metrics,
    }


def load_model(path: str | Path, device="cpu") -> tuple[GPT, dict]:
    """A trained AR model from ``model.ckpt`` (strict, ``weights_only``), in eval mode."""
    ckpt = load_checkpoint(path, CKPT_FORMAT_MODEL)
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.to(device).eval(), ckpt


class BestCheckpoint(L.Callback):
    """Keeps ``DIR/model.ckpt`` at the best validation loss (written atomically) and a history."""

    def __init__(self, out: Path, header: dict):
        self.out, self.header = Path(out), header
        self.best = float("inf")
        self.best_step = -1
        self.history: list[dict] = []

    def on_validation_end(self, trainer, pl_module: LitGPT):
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        if "val/loss" not in m:
            return
        loss = float(m["val/loss"])
        rec = {"step": trainer.global_step, "val_loss": loss, "val_bits_per_token": loss / math.log(2),
               "train_tokens": pl_module.train_tokens}  # fmt: skip
        self.history.append(rec)
        if loss < self.best and trainer.is_global_zero:
            from .data import atomic_torch_save

            self.best, self.best_step = loss, trainer.global_step
            ckpt = model_checkpoint(pl_module.eval_model(), header=self.header,
                                    train={"step": trainer.global_step, "train_tokens": pl_module.train_tokens,
                                           "hparams": dict(pl_module.hparams)},
                                    metrics=rec)  # fmt: skip
            atomic_torch_save(ckpt, self.out / "model.ckpt")


# =========================================================================== classifier

from .metrics import SmallCNN  # noqa: E402


class LitClassifier(L.LightningModule):
    """Trains the small CNN whose features score FID/KID (penultimate layer) and IS (logits)."""

    def __init__(self, width: int = 32, feature_dim: int = 128, dropout: float = 0.3, lr: float = 2e-3,
                 weight_decay: float = 5e-4, augment: bool = True):  # fmt: skip
        """
        Args:
            width: channels of the first conv stage (doubled twice).
            feature_dim: size of the penultimate layer (the FID/KID features).
            dropout: dropout before the logits.
            lr: peak learning rate (AdamW, one-cycle cosine over the run).
            weight_decay: AdamW weight decay.
            augment: random shifts of up to 2 pixels during training.
        """
        super().__init__()
        self.save_hyperparameters()
        self.net: SmallCNN | None = None

    def build(self, num_classes: int, channels: int, image_size: int) -> None:
        h = self.hparams
        self.net = SmallCNN(num_classes=num_classes, channels=channels, image_size=image_size, width=h.width,
                            feature_dim=h.feature_dim, dropout=h.dropout)  # fmt: skip

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        total = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.hparams.lr, total_steps=int(total)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _shift(self, x):
        if not self.hparams.augment:
            return x
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,)))
        return torch.roll(F.pad(x, (2, 2, 2, 2), value=-1.0), shifts=(dy, dx), dims=(2, 3))[
            ..., 2:-2, 2:-2
        ]

    def training_step(self, batch, batch_idx):
        x, y = batch[:2]
        logits = self.net(self._shift(x))
        loss = F.cross_entropy(logits, y)
        self.log_dict(
            {"train/loss": loss, "train/acc": (logits.argmax(-1) == y).float().mean()},
            prog_bar=True,
        )
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch[:2]
        logits = self.net(x)
        self.log_dict({"val/loss": F.cross_entropy(logits, y), "val/acc": (logits.argmax(-1) == y).float().mean()},
                      prog_bar=True, batch_size=len(x))  # fmt: skip


@torch.no_grad()
def classifier_accuracy(net: SmallCNN, dataset, device="cpu", batch_size: int = 1000) -> float:
    net = net.to(device).eval()
    right = n = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        right += (net(x.to(device)).argmax(-1).cpu() == y).sum().item()
        n += len(y)
    return right / max(n, 1)
