"""LightningModules and callbacks: the tokenizer, the AR model and the evaluation classifier.

The model files (``tokenizer.py``, ``model.py``, ``move.py``, ``classifier.py``) know nothing of
Lightning; this file wraps them with losses, optimisers, schedules and logging.

Imports run one way (DESIGN §6): this module imports the model files, ``metrics`` (the
tokenizer's validation scores) and ``checkpoint`` (the best-model checkpoint); ``cli`` imports
it. The DataModules live with the data (``movegen.data``), the scores in ``metrics``, the
checkpoint formats and loaders in ``checkpoint``.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .checkpoint import atomic_torch_save, model_checkpoint
from .classifier import SmallCNN
from .metrics import reduce_tokenizer_stats, tokenizer_batch_stats
from .model import GPT, Block, GPTConfig, RMSNorm
from .move import LaVETable, MoVEBank
from .runs import RunInterrupted, TrainingDiverged
from .tokenizer import (
    PatchDiscriminator,
    TokenizerConfig,
    VGGPerceptual,
    VQTokenizer,
    find_vgg_weights,
    psnr,
)

log = logging.getLogger(__name__)

TRAIN_STATE_FORMAT = "movegen.train-state/1"


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
        rec_loss: Literal["l1", "l2"] = "l1",
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

    def setup(self, stage: str) -> None:
        # the step clips the generator's gradients alone (the discriminator's stay out of the
        # norm); Lightning's FSDP cannot clip a subset of the weights and refuses to clip at all
        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError("fit-tokenizer does not train under FSDP (its step clips the generator's gradients "
                             "alone, which FSDP's clipping cannot); use --trainer.strategy ddp or one device")  # fmt: skip

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


# =========================================================================== AR model


# Weight decay by module type: matrices of linear maps decay; lookup tables (token and class
# embeddings, the MoVE bank, LaVE tables) and norm gains never do, for every variant alike
# (DESIGN §2), so comparisons between memory kinds stay controlled.
DECAY_MODULES: tuple[type[nn.Module], ...] = (nn.Linear,)
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Embedding,
    MoVEBank,
    LaVETable,
    RMSNorm,
    nn.LayerNorm,
    nn.RMSNorm,
)


MEMORY_MODULES: tuple[type[nn.Module], ...] = (MoVEBank, LaVETable)


def clip_grad_norm_for_step(
    params, optimizer: torch.optim.Optimizer, max_norm: float
) -> torch.Tensor:
    """Clip the gradients of ``params`` to a total norm of ``max_norm`` for ``optimizer``'s next
    step (``torch.nn.utils.clip_grad_norm_``'s coefficient) and return the norm before clipping.
    For a fused Adam or AdamW holding every one of these gradients, the coefficient goes to the
    step itself (its ``grad_scale``, by which the fused kernel divides each gradient as it reads
    it, the hook GradScaler uses), so the gradients are not rewritten in a pass of their own:
    ``.grad`` stays unclipped, and the step updates the weights as from the clipped gradients.
    The coefficient serves that one step only. Any other optimizer: clipped in place. Not for a
    step under an fp16 GradScaler, which sets ``grad_scale`` itself (unscale and clip first)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if _folds_clip(optimizer, params):
        optimizer.grad_scale = torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)
        if not getattr(optimizer, "_movegen_clip_hook", False):
            # the coefficient is dropped once the step has used it
            optimizer.register_step_post_hook(lambda opt, *_: opt.__dict__.pop("grad_scale", None))
            optimizer._movegen_clip_hook = True
    else:
        optimizer.__dict__.pop("grad_scale", None)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


def _folds_clip(optimizer, params) -> bool:
    """Whether ``optimizer`` is a fused Adam(W) that steps every one of ``params``."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    if not all(g.get("fused") for g in optimizer.param_groups):
        return False
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return all(id(p) in held for p in params)


def optimizer_groups(model: nn.Module, weight_decay: float, *, memory_lr_scale: float = 1.0,
                     memory_weight_decay: float = 0.0, lr: float | None = None) -> list[dict]:  # fmt: skip
    """AdamW groups ``[decay, no_decay]``: weight decay on ``nn.Linear`` weights only, never on
    norms, embeddings, the MoVE bank or LaVE tables (biases, if any, do not decay either).
    With ``memory_lr_scale != 1`` or ``memory_weight_decay != 0`` the memory (bank, tables)
    gets a third group ``[decay, no_decay, memory]`` with learning rate ``lr *
    memory_lr_scale`` and that weight decay. Raises for a parameter of a module type without a
    rule; every trainable parameter lands in exactly one group."""
    own = memory_lr_scale != 1.0 or memory_weight_decay != 0.0
    decay, no_decay, memory, seen = [], [], [], set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if own and isinstance(module, MEMORY_MODULES):
                memory.append(p)
            elif isinstance(module, DECAY_MODULES) and pname == "weight":
                decay.append(p)
            elif isinstance(module, DECAY_MODULES + NO_DECAY_MODULES):
                no_decay.append(p)
            else:
                raise TypeError(
                    f"no weight-decay rule for {mname}.{pname} ({type(module).__name__}); "
                    "add its module type to DECAY_MODULES or NO_DECAY_MODULES in movegen/lit.py"
                )
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for p in decay + no_decay + memory]
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable, (
        "groups must partition the parameters"
    )
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if memory:
        if lr is None:
            raise ValueError("a memory learning-rate scale needs the base lr")
        groups.append(
            {"params": memory, "weight_decay": memory_weight_decay, "lr": lr * memory_lr_scale}
        )
    return groups


RESUME_MAY_CHANGE = ("save_rotated_qk",)
"""``LitGPT`` settings that change speed or memory and never the numbers: a resume may change them."""


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
        schedule: Literal["cosine", "constant"] = "cosine",
        min_lr_ratio: float = 0.1,
        ema_decay: float = 0.0,
        compile: bool = False,
        compile_mode: Literal[
            "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
        ] = "default",
        cuda_graph: bool = False,
        memory_lr_scale: float = 1.0,
        memory_weight_decay: float = 0.0,
        save_rotated_qk: bool = True,
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
            compile_mode: torch.compile's mode with ``compile``; 'reduce-overhead' also replays
                the compiled forward and backward as CUDA graphs (fused kernels and no launch
                overhead: what small models need; not yet measured here).
            cuda_graph: capture the training forward and backward (loss included) as CUDA graphs
                at the first step (``torch.cuda.make_graphed_callables``) and replay them at
                every step: two launches instead of ~1,000 small kernels dispatched from Python,
                which bound the small models' steps. One CUDA device, bf16-mixed or 32-bit
                precision, fixed batch shape (the step batches are), not with ``compile``.
                Dropout and class dropout still draw fresh numbers at every replay; a resume
                draws the same ones as the uninterrupted run.
            memory_lr_scale: learning rate of the memory (MoVE bank, LaVE tables) as a multiple
                of lr (same schedule); 1 keeps it in the no-decay group.
            memory_weight_decay: AdamW weight decay of the memory (0: none, as for every lookup
                table); a regulariser for a bank that memorises.
            save_rotated_qk: on a GPU, the attention's forward (which reads q and k straight
                from the QKV product, rotating them as it loads them) also writes the rotated q
                and k for its backward to read (``"ropesave"`` in ``GPT.fused_ops``): the GPT-B
                step at batch 256 was 2.0 ms faster on an H100 for 2.25 GiB more activation
                memory (``benchmarks/RESULTS.md``, 2026-12-07). False gives that memory back;
                the backward then rotates them again. The results are the same either way, so
                a resume may change it (after running out of memory, say).
        """
        super().__init__()
        if memory_lr_scale < 0 or memory_weight_decay < 0:
            raise ValueError(f"memory_lr_scale and memory_weight_decay must be >= 0, got {memory_lr_scale} "
                             f"and {memory_weight_decay}")  # fmt: skip
        if compile and cuda_graph:
            raise ValueError("choose one of compile and cuda_graph (for both, compile with "
                             "--model.compile_mode reduce-overhead)")  # fmt: skip
        if compile_mode != "default" and not compile:
            raise ValueError(
                f"--model.compile_mode {compile_mode} takes effect with --model.compile true"
            )
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
        self.save_hyperparameters(ignore=["config"])
        self.config = config
        self.model = GPT(config)
        if not save_rotated_qk:
            self.model.fused_ops = tuple(o for o in self.model.fused_ops if o != "ropesave")
        self.ema = None
        if ema_decay > 0:
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
            self.ema.requires_grad_(False)
        self._fwd = None
        self._graphed = None  # the captured training loss (cuda_graph), built at the first step
        self._t_last = None
        self.train_tokens = 0
        # the first step whose loss was not finite (-1: none); kept on the device, read only at
        # validation and at saves, so the step itself never waits for the host
        self.register_buffer("first_bad_step", torch.tensor(-1, dtype=torch.long), persistent=False)
        self._rng_to_restore = None

    def loss_fn(self):
        """Cross-entropy of the model on ``(codes, labels)``; compiled as one graph (forward and
        loss, so the fp32 logits are never materialised) when ``compile``."""
        if self._fwd is None:
            step = _LossStep(self.model)
            # a plain attribute, not a submodule: no second copy of the weights in the state dict
            h = self.hparams
            mode = None if h.get("compile_mode", "default") == "default" else h.compile_mode
            object.__setattr__(self, "_fwd", torch.compile(step, mode=mode) if h.compile else step)
        return self._fwd

    def train_loss(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch: the graphed replay with ``cuda_graph``, else
        :meth:`loss_fn`."""
        if not self.hparams.cuda_graph:
            if self.hparams.get("compile_mode") == "reduce-overhead" and codes.is_cuda:
                # a new step for the compiled graphs; their output buffer is reused at the next
                # replay, so the loss handed to Lightning is a copy
                torch.compiler.cudagraph_mark_step_begin()
                return self.loss_fn()(codes, labels).clone()
            return self.loss_fn()(codes, labels)
        if self._graphed is None:
            object.__setattr__(self, "_graphed", self._capture(codes, labels))  # not a submodule
        # the replay's output is a static buffer that the next replay overwrites: hand out a copy
        return self._graphed(codes, labels).clone()

    def _capture(self, codes: torch.Tensor, labels: torch.Tensor):
        if codes.device.type != "cuda":
            raise ValueError(f"--model.cuda_graph true needs a CUDA device; this run trains on {codes.device.type} "
                             "(set --model.cuda_graph false)")  # fmt: skip
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        if world > 1:
            raise ValueError(f"--model.cuda_graph true runs in one process; this run has {world} "
                             "(set --model.cuda_graph false, or use --model.compile true)")  # fmt: skip
        precision = str(trainer.precision) if trainer is not None else "32-true"
        if (
            precision.startswith("16")
            or precision.startswith("bf16-true")
            or precision.startswith("64")
        ):
            raise ValueError(
                f"--model.cuda_graph true supports bf16-mixed and 32-true precision, not {precision}"
            )
        step = _LossStep(self.model)  # not a submodule: no second copy in the state dict
        # the warm-up and capture draw dropout numbers; put the generator back so that a replay
        # at step s draws what it would have drawn, fresh or resumed
        dev = codes.device
        rng = torch.cuda.get_rng_state(dev)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision.startswith("bf16"),
                            cache_enabled=False):  # fmt: skip
            # copies as the sample: the capture's sample tensors become the graphs' static
            # inputs, which every replay overwrites with its batch (the caller's first batch
            # must not change under it)
            graphed = torch.cuda.make_graphed_callables(step, (codes.clone(), labels.clone()),
                                                        allow_unused_input=True)  # fmt: skip
        torch.cuda.set_rng_state(rng, dev)
        return graphed

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer (it assumes an
        # fp16 grad scaler). bf16 has no scaler, so clipping the gradients directly is exact.
        if not gradient_clip_val:
            return
        strategy = self.trainer.strategy
        sharded = isinstance(strategy, FSDPStrategy)
        fp16 = str(self.trainer.precision).startswith("16")
        if fp16 and not sharded:  # let Lightning unscale first
            return self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"only norm clipping is supported, got {gradient_clip_algorithm!r}")
        if sharded:
            # Each rank holds a shard of every gradient, so the norm of this rank's shards is not
            # the norm: the FSDP root sums every rank's share (a collective). Lightning's FSDP
            # plugin refuses norm clipping; under 16-mixed it has unscaled the gradients by now.
            strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        # fused AdamW: the clip's coefficient applied inside the step (clip_grad_norm_for_step)
        clip_grad_norm_for_step(self.model.parameters(), optimizer, gradient_clip_val)

    def configure_optimizers(self):
        # fused AdamW on GPU, except under fp16 loss scaling (its gradients must be unscaled first);
        # where the weights are, not the module: FSDP moves the weights without telling it
        fp16 = self.trainer is not None and str(self.trainer.precision).startswith("16")
        fused = next(self.model.parameters()).is_cuda and not fp16
        h = self.hparams
        groups = optimizer_groups(self.model, h.weight_decay, memory_lr_scale=h.memory_lr_scale,
                                  memory_weight_decay=h.memory_weight_decay, lr=h.lr)  # fmt: skip
        opt = torch.optim.AdamW(groups, lr=self.hparams.lr,
                                betas=self.hparams.betas, fused=fused)  # fmt: skip
        total = schedule_length(self.trainer)
        f = lambda s: warmup_cosine(s, warmup=self.hparams.warmup_steps, total=total,
                                    min_ratio=self.hparams.min_lr_ratio, schedule=self.hparams.schedule)  # fmt: skip
        sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def training_step(self, batch, batch_idx):
        codes, labels = batch
        loss = self.train_loss(codes, labels)
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad_step < 0)
        self.first_bad_step.copy_(torch.where(bad, self.trainer.global_step, self.first_bad_step))
        n = codes.numel() * self.trainer.world_size
        self.train_tokens += n
        # tokens/s over the logging window, on the host: a Python number logged every step
        # would be copied to the device, and that copy waits for the GPU at every step
        every = max(1, self.trainer.log_every_n_steps)
        if self.trainer.global_step % every == 0:
            now = time.perf_counter()
            if self._t_last is not None:
                t, tokens = self._t_last
                self.log("train/tokens_per_s", (self.train_tokens - tokens) / max(now - t, 1e-9))
            self._t_last = (now, self.train_tokens)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def eval_model(self) -> GPT:
        return self.ema.module if self.ema is not None else self.model

    def gathered_eval_weights(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP, the weights of :meth:`eval_model` gathered whole from every rank's
        shards: a collective that every rank must call; rank 0 gets them (on the CPU), the
        others an empty dict. None under any other strategy, where the module holds them."""
        strategy = self.trainer.strategy
        if not isinstance(strategy, FSDPStrategy):
            return None
        return eval_weights(strategy.lightning_module_state_dict(), ema=self.ema is not None)

    def validation_step(self, batch, batch_idx):
        codes, labels = batch
        logits = self.eval_model()(codes, labels)
        loss = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
        acc = (logits.argmax(-1) == codes).float().mean()
        self.log_dict({"val/loss": loss, "val/bits_per_token": loss / math.log(2), "val/acc": acc},
                      prog_bar=True, sync_dist=True, batch_size=len(codes))  # fmt: skip

    def nonfinite_step(self) -> int | None:
        """The first training step whose loss was NaN or infinite, None if none (syncs). With
        several processes, the first over all of them: a collective, so that every rank stops
        (or saves) alike."""
        s, trainer = self.first_bad_step, self._trainer
        if trainer is not None and trainer.world_size > 1:
            none = torch.iinfo(s.dtype).max  # stands for -1 (no bad step) in the minimum
            s = torch.where(s < 0, none, s).to(trainer.strategy.root_device)
            s = int(trainer.strategy.reduce(s, reduce_op="min"))
            return None if s == none else s
        s = int(s)
        return None if s < 0 else s

    # The training state (``last.ckpt``) is Lightning's checkpoint plus what an exact resume
    # needs beyond it: the token counter, the RNG states (dropout and class dropout draw from
    # them) and the model config, all tensors, numbers and strings (``weights_only`` loads it).
    def on_save_checkpoint(self, checkpoint):
        checkpoint["format"] = TRAIN_STATE_FORMAT
        checkpoint["train_tokens"] = self.train_tokens
        checkpoint["model_config"] = asdict(self.config)
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        if isinstance(self.trainer.strategy, FSDPStrategy):
            checkpoint["fsdp"] = True  # the optimizer state is keyed in FSDP's order

    def on_load_checkpoint(self, checkpoint):
        self.check_resumable(checkpoint)
        self.train_tokens = checkpoint.get("train_tokens", 0)
        self._rng_to_restore = checkpoint.get("rng")

    def check_resumable(self, checkpoint: dict) -> None:
        """Raise unless the training state ``checkpoint`` continues this model with these settings."""
        # FSDP numbers the optimizer's tensors in the model's order, Lightning's other strategies
        # in the parameter groups' order: a state read the other way would scramble AdamW's moments
        written = bool(checkpoint.get("fsdp"))
        if written != isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError("this training state was written " + ("under FSDP: resume it with --trainer.strategy fsdp"
                             if written else "without FSDP: resume it with the strategy it was written with, not fsdp")
                             + " (the optimizer state is laid out differently under FSDP)")  # fmt: skip
        saved, now = checkpoint.get("model_config") or {}, asdict(self.config)
        diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if saved and diff:
            raise ValueError("--resume continues the same model, but model.config differs from the saved state's: "
                             + ", ".join(f"{k} {a!r} (saved) vs {b!r} (now)" for k, (a, b) in diff.items()))  # fmt: skip
        saved_h = checkpoint.get("hyper_parameters") or {}
        diff = {k: (saved_h.get(k), v) for k, v in dict(self.hparams).items()
                if k in saved_h and k not in RESUME_MAY_CHANGE and _norm(saved_h[k]) != _norm(v)}  # fmt: skip
        if diff:
            raise ValueError("--resume continues the same run, but the model's settings differ from the saved state's: "
                             + ", ".join(f"{k} {a!r} (saved) vs {b!r} (now)" for k, (a, b) in diff.items()))  # fmt: skip

    def on_fit_start(self):
        # graph replays hand out their gradient buffers: accumulating into them would add a
        # micro-batch's gradient to itself, so both graph modes train one batch per step
        accumulate = self.trainer.accumulate_grad_batches
        graphs = ("--model.cuda_graph true" if self.hparams.cuda_graph else
                  "--model.compile_mode reduce-overhead" if self.hparams.get("compile_mode") == "reduce-overhead"
                  else None)  # fmt: skip
        if graphs and accumulate > 1:
            raise ValueError(f"{graphs} trains one batch per step; this run accumulates {accumulate} (set "
                             "--trainer.accumulate_grad_batches 1 and raise --data.batch_size, or another "
                             "compile setting)")  # fmt: skip
        if isinstance(self.trainer.strategy, FSDPStrategy):
            if graphs:
                raise ValueError(f"{graphs} cannot capture FSDP's gathers of the weights; under FSDP use "
                                 "--model.compile true (default mode), or train with DDP")  # fmt: skip
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            # the EMA update is a local operation only when each rank holds the same elements of
            # the model and of its EMA copy: each GPT must be a unit of its own
            if self.ema is not None and not (
                isinstance(self.model, FSDP) and isinstance(self.ema.module, FSDP)
            ):
                raise ValueError("--model.ema_decay under FSDP needs the model and its EMA copy sharded alike (each "
                                 "GPT a unit of its own): train with --trainer.strategy fsdp")  # fmt: skip

    def on_fit_end(self):
        # the captured graphs read the parameters' memory at capture time, which the end of a fit
        # may move (Lightning's teardown): a later fit of this module captures afresh
        object.__setattr__(self, "_graphed", None)
        if self.hparams.get("compile_mode") == "reduce-overhead":
            object.__setattr__(self, "_fwd", None)

    def on_train_start(self):
        rng, self._rng_to_restore = self._rng_to_restore, None
        if rng:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


def eval_weights(state: dict[str, torch.Tensor], *, ema: bool) -> dict[str, torch.Tensor]:
    """The weights of :meth:`LitGPT.eval_model` (the EMA copy's with ``ema``) out of a state dict
    of the whole :class:`LitGPT`, keyed as :class:`GPT` keys them."""
    prefix = "ema.module." if ema else "model."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


class _LossStep(nn.Module):
    """The model's training cross-entropy as a module, the unit that ``cuda_graph`` captures."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, codes, labels):
        return self.model.loss(codes, labels)


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


class BestCheckpoint(L.Callback):
    """Keeps ``DIR/model.ckpt`` at the best validation loss (written atomically, with the
    training state and at the end of training) and a history. Its state (best, best step,
    history) travels in the training state, so a resumed run keeps the same best and the whole
    curve. With ``patience`` N it stops training once N validations in a row were no better than
    the best (``stopped_early``)."""

    def __init__(self, out: Path, header: dict, write_every_validation: bool = False,
                 patience: int | None = None):  # fmt: skip
        if patience is not None and patience < 1:
            raise ValueError(
                f"--patience counts validations without improvement and must be >= 1, got {patience}"
            )
        self.out, self.header, self.patience = Path(out), header, patience
        self.stopped_at: int | None = None
        self.best = float("inf")
        self.best_step = -1
        self.history: list[dict] = []
        # The best weights are written with the training state (and at the end): on disk,
        # model.ckpt is always the best of what last.ckpt has seen, and short runs are not
        # bound by writing a checkpoint at every validation.
        self.write_every_validation = write_every_validation
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step = float(state["best"]), int(state["best_step"])
        self.history = list(state["history"])

    def on_validation_end(self, trainer, pl_module: LitGPT):
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        if "val/loss" not in m:
            return
        loss = float(m["val/loss"])
        bad = pl_module.nonfinite_step()
        if bad is not None or not math.isfinite(loss):
            self.write()  # the best model so far was finite: keep it
            raise TrainingDiverged(
                diverged_message(bad if bad is not None else trainer.global_step, self, loss)
            )
        rec = {"step": trainer.global_step, "val_loss": loss, "val_bits_per_token": loss / math.log(2),
               "train_tokens": pl_module.train_tokens}  # fmt: skip
        self.history.append(rec)
        if loss < self.best:  # the same on every rank: the loss is reduced over all of them
            self.best, self.best_step = loss, trainer.global_step
            weights = pl_module.gathered_eval_weights()  # under FSDP every rank gathers
            if trainer.is_global_zero:  # a CPU copy now; on disk when the training state is
                self._pending = model_checkpoint(pl_module.eval_model(), header=self.header,
                                                 train={"step": trainer.global_step, "train_tokens": pl_module.train_tokens,
                                                        "hparams": dict(pl_module.hparams)},
                                                 metrics=rec, state_dict=weights)  # fmt: skip
        since = sum(r["step"] > self.best_step for r in self.history)
        last = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if self.patience is not None and since >= self.patience and not last:
            self.stopped_at = trainer.global_step
            log.info("stopping early at step %d: %d validations without improvement on %.4f (step %d)",
                     trainer.global_step, since, self.best, self.best_step)  # fmt: skip
            trainer.should_stop = True
        if self.write_every_validation:
            self.write()

    @property
    def stopped_early(self) -> bool:
        """Whether ``patience`` ended training before ``max_steps``."""
        return self.stopped_at is not None

    def write(self) -> None:
        """Put the best model seen so far on disk (``model.ckpt``, atomically), if it is not."""
        if self._pending is not None:
            atomic_torch_save(self._pending, self.out / "model.ckpt")
            self._pending = None


def diverged_message(step: int, best: BestCheckpoint, val_loss: float | None = None) -> str:
    """What a run that went non-finite at ``step`` says: where, what is kept, what to try."""
    kept = (f"the last good {best.out / 'model.ckpt'} (step {best.best_step}, val {best.best / math.log(2):.4f} "
            "bits/token) is kept" if best.best_step >= 0 else "no model.ckpt was written (no validation before it)")  # fmt: skip
    val = f" (validation loss {val_loss})" if val_loss is not None else ""
    return (
        f"the training loss became NaN or infinite at step {step}{val}; training stopped, {kept}. "
        "Lower --model.lr, keep --trainer.gradient_clip_val 1.0, or raise --model.warmup_steps"
    )


class TrainingState(L.Callback):
    """Writes the training state ``DIR/last.ckpt`` (weights, optimizer, LR schedule, EMA, data
    position, RNG states, counters, the best-checkpoint tracker) atomically, with the best
    model beside it: at the first validation ``interval_s`` seconds after the last write (or
    after every ``every`` validations when given), at the end, and on SIGINT/SIGTERM at the
    next step boundary, after which the run stops (a second signal quits at once). Never
    writes a state whose loss went non-finite."""

    def __init__(self, out: Path, every: int | None = None, interval_s: float = 600.0,
                 best: BestCheckpoint | None = None):  # fmt: skip
        self.path, self.every, self.interval_s, self.best = (
            Path(out) / "last.ckpt",
            every,
            interval_s,
            best,
        )
        self._last_save = time.time()
        self.interrupted: int | None = None  # the signal received
        self.saved_step: int | None = None
        self._validations = 0
        self._old: dict = {}
        self._seconds_before = 0.0  # training time of the run before this process
        self._t0 = time.time()

    def train_seconds(self) -> float:
        """Wall time of the run so far, over every process that trained it."""
        return self._seconds_before + time.time() - self._t0

    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds()}

    def load_state_dict(self, state: dict) -> None:
        self._seconds_before = float(state.get("train_seconds", 0.0))

    # signals: installed for the fit only, restored afterwards
    def _handler(self, signum, frame):
        if self.interrupted is not None:  # a second Ctrl-C: quit now
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.interrupted = signum

    def on_fit_start(self, trainer, pl_module):
        self._t0 = time.time()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)

    def on_fit_end(self, trainer, pl_module):
        self._restore()

    def on_exception(self, trainer, pl_module, exception):
        self._restore()

    def _restore(self):
        for sig, h in self._old.items():
            signal.signal(sig, h)
        self._old = {}

    def save(self, trainer, pl_module) -> None:
        if getattr(pl_module, "nonfinite_step", lambda: None)() is not None:
            return
        if self.best is not None and trainer.is_global_zero:
            self.best.write()  # first: a model.ckpt never lags the state that records it as best
        trainer.save_checkpoint(self.path)
        self.saved_step = trainer.global_step
        self._last_save = time.time()

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self._validations += 1
        due = (self._validations % self.every == 0 if self.every
               else time.time() - self._last_save >= self.interval_s)  # fmt: skip
        if due or self.interrupted is not None:
            self.save(trainer, pl_module)
        if self.interrupted is not None:
            self._stop(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.interrupted is None:
            return
        # A validation due at this step runs first and saves there (a state saved before it
        # would skip it on resume); otherwise save now.
        if not _val_due(trainer):
            self.save(trainer, pl_module)
            self._stop(trainer)

    def _stop(self, trainer):
        # raised, not ``trainer.should_stop``: Lightning would run an extra validation first
        at = (f"the training state at step {self.saved_step} is in {self.path}" if self.saved_step is not None
              else "no training state was saved")  # fmt: skip
        raise RunInterrupted(f"interrupted at step {trainer.global_step}; {at}; continue with the same command "
                             "and --resume true")  # fmt: skip


def _val_due(trainer) -> bool:
    """Whether Lightning runs a validation after the current training batch."""
    loop = trainer.fit_loop.epoch_loop
    try:
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except Exception:  # a Lightning without these internals: save after the next validation
        return True


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O for the training state: atomic writes, and loads that run no
    pickled code (``weights_only=True``) and accept only a movegen training state."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return read_training_state(path)


def read_training_state(path, *, mmap: bool = False) -> dict:
    """A training state ``last.ckpt``, loaded as data only (``weights_only``); a clear error for a
    truncated file or one of another kind. ``mmap`` maps the tensors rather than reading them."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path} is not a readable training state ({type(e).__name__}: {str(e)[:200]}); it may be "
                         "truncated. Delete it and start again with --overwrite true") from None  # fmt: skip
    if not isinstance(ckpt, dict) or ckpt.get("format") != TRAIN_STATE_FORMAT:
        fmt = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a movegen training state (format {fmt!r}, expected "
                         f"{TRAIN_STATE_FORMAT!r}); --resume needs the last.ckpt `movegen fit` wrote")  # fmt: skip
    return ckpt


class BlockFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP (torch's ``FullyShardedDataParallel``) as ``movegen fit`` trains with it;
    ``--trainer.strategy fsdp`` picks it (on CUDA GPUs).

    * **Units.** Each transformer :class:`~movegen.model.Block` is a unit of its own, and so is
      each :class:`~movegen.model.GPT` (the model, and its EMA copy when there is one): a unit's
      weights are gathered only around its forward and backward. The model and its EMA copy are
      sharded alike, element for element, so the EMA update stays local to each rank's shards.
    * **Arithmetic.** DDP's: the shards hold fp32 weights, gradients and AdamW state, bf16-mixed
      autocasts the forward as on one device, and gradients are reduced in fp32. (Lightning's
      FSDP default instead casts the weights, the buffers -- the RoPE tables -- and the
      gradient reduction to bf16.) Every rank starts from rank 0's weights, as under DDP.
    * **Clipping** is by the norm over every rank's shards (:meth:`LitGPT.configure_gradient_clipping`).
    * **Checkpoints.** ``model.ckpt`` holds the full weights, gathered by every rank to rank 0;
      the training state ``last.ckpt`` is one file with the full weights and optimizer state
      (gathered to rank 0 too), which every rank reads on ``--resume``. Its optimizer state is
      keyed in FSDP's order, so it resumes under FSDP only (and a DDP state under DDP only).
    """

    def __init__(
        self,
        sharding_strategy: Literal[
            "FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"
        ] = "FULL_SHARD",
    ):
        """
        Args:
            sharding_strategy: what is sharded over the GPUs: 'FULL_SHARD' the weights, gradients
                and optimizer state (a unit's weights are gathered for its forward and again for
                its backward); 'SHARD_GRAD_OP' gradients and optimizer state (the weights stay
                gathered from forward to backward: more memory, less traffic); 'HYBRID_SHARD'
                FULL_SHARD within each machine, replicated across machines; 'NO_SHARD' nothing
                (DDP's layout).
        """
        from torch.distributed.fsdp import MixedPrecision

        super().__init__(
            auto_wrap_policy={GPT, Block},
            mixed_precision=MixedPrecision(),  # no casts by FSDP: autocast does them
            sharding_strategy=sharding_strategy,
            state_dict_type="full",
            sync_module_states=True,
        )

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        # Lightning reads a full FSDP checkpoint with an unpickler of its own and loads the
        # weights before any hook of the module runs: check the file first, as SafeCheckpointIO
        # does under the other strategies (its tensors mapped, not read)
        state = read_training_state(checkpoint_path, mmap=True)
        if isinstance(self.lightning_module, LitGPT):
            self.lightning_module.check_resumable(state)
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)


# =========================================================================== classifier


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
