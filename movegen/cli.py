"""The ``movegen`` console script. The only module that configures logging and parses arguments.

Two kinds of verbs, one spelling of every flag (underscores, as Lightning spells its own):

* **Training verbs** (``fit-tokenizer``, ``fit``, ``fit-classifier``) go through one
  ``LightningCLI`` subclass, :class:`TrainCLI`: ``--config YAML``, dotted overrides
  (``--trainer.max_steps 200``, ``--data.root DIR``) and ``--print_config`` all work, and the
  trainer defaults of :data:`TRAINER_DEFAULTS` really apply (``--print_config`` shows them).
  The optimiser is the model's own (``configure_optimizers``: its parameter groups keep the bank
  and tables out of weight decay), so no ``--optimizer`` switch is offered.
* **Other verbs** are the typed functions below (:func:`extract_codes`, :func:`info`,
  :func:`sample`, :func:`evaluate`, :func:`report`, :func:`demo`): their signatures and
  docstrings are the command line (jsonargparse), so ``movegen <verb> --help`` explains every
  knob, and Python code (the demo, notebooks, tests) calls them directly.

The training verbs are Python functions too (:func:`fit_tokenizer`, :func:`fit`,
:func:`fit_classifier`): they take the built LightningModule and DataModule, the trainer's
settings and the run folder; the parser only builds those.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .sample import SamplingSettings

log = logging.getLogger("movegen")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

VERBS = {
    "fit-tokenizer": "train a VQ tokenizer (--config tokenizers/<name>/config.yaml --out DIR)",
    "extract-codes": "encode a dataset split into a code store",
    "fit": "train an AR model on a code store (--config configs/... --data.codes CODES --out DIR)",
    "info": "parameters, FLOPs per token and bank bytes of a model config (no data needed)",
    "sample": "sample a PNG grid (one row per class) from a trained model",
    "fit-classifier": "train the small CNN whose features score FID/IS/KID offline",
    "evaluate": "FID / IS / KID and validation bits per token of one or more models",
    "study": "train and evaluate arms x seeds x budgets, then a report (--config configs/studies/...)",
    "report": "turn evaluation results into a markdown table and plots",
    "convert": "turn LlamaGen checkpoints into movegen ones (convert llamagen-vq | llamagen-gpt ...)",
    "demo": "the whole pipeline on the embedded digits data",
}

# Trainer settings each training verb applies unless the YAML or the command line says
# otherwise. ``precision`` is filled in at start-up: bf16 mixed precision on a GPU, fp32 on a CPU.
TRAINER_DEFAULTS: dict[str, dict[str, Any]] = {
    "fit": {"gradient_clip_val": 1.0, "max_steps": 5000, "precision": None},
    "fit-tokenizer": {"max_steps": 2000, "precision": None},
    "fit-classifier": {"max_epochs": 6},
}
# Every training verb writes its own checkpoints and summary, so Lightning's are off.
_TRAINER_COMMON = {"enable_checkpointing": False, "enable_model_summary": False}


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip
    for noisy in ("matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _quiet_lightning() -> None:
    """Lightning's device summaries, seeds and tips (INFO, printed through handlers of its own)
    stay out of the terminal; its warnings and errors reach our handler. Call after importing
    Lightning: its loggers exist from then on."""
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"):
            logger = logging.getLogger(name)
            logger.setLevel(max(logger.level, logging.WARNING))
            for h in list(logger.handlers):
                logger.removeHandler(h)
            logger.propagate = True


def _quiet_third_party() -> None:
    """Warnings from third-party code that say nothing to a movegen user (their cause is not
    ours, or is handled where we call them). Filtered here only, never in the library."""
    for pattern in (
        r".*LightningCLI's args parameter is intended.*",  # we pass the verb's own argv
        r".*LeafSpec.*is deprecated.*",  # Lightning's pytree helper on newer torch
        r".*does not have many workers.*",  # small in-memory datasets need none
        r".*`isinstance\(treespec, LeafSpec\)`.*",
        r".*will save all extracted features in buffer.*",  # torchmetrics' KID/IS: ours are small
        r".*FSDP is switching to use `NO_SHARD`.*",  # fsdp on one GPU: nothing to shard
        r".*full_state_dict will ?be returned.*",  # the same, at every gathered checkpoint
    ):
        warnings.filterwarnings("ignore", message=pattern)


def _device(name: str = "auto") -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _write_config(out: Path, config_yaml: str | None, resume: bool = False) -> None:
    """The parsed configuration of a run, beside it (a resumed run keeps the first one and
    adds its own as config-resumed.yaml)."""
    if config_yaml:
        from .checkpoint import atomic_write_text

        atomic_write_text(out / ("config-resumed.yaml" if resume else "config.yaml"), config_yaml)


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None: the JSON we write is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_json(path: Path, obj: Any) -> None:
    from .checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(_finite(obj), indent=2, allow_nan=False))


# =========================================================================== training verbs


def _trainer_defaults(verb: str) -> dict[str, Any]:
    import torch

    out = {**_TRAINER_COMMON, **TRAINER_DEFAULTS[verb]}
    if "precision" in out:
        out["precision"] = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    return out


def _make_trainer(trainer: dict[str, Any], out: Path, callbacks: list | None = None,
                  num_batches: int | None = None):  # fmt: skip
    """The one Trainer of a run: the parsed settings, the run folder as its root and a CSV logger
    there (unless ``logger: false``), ``callbacks`` added to the configured ones."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    _quiet_lightning()
    kwargs = dict(trainer)
    if kwargs.get("logger") in (None, True):
        kwargs["logger"] = CSVLogger(str(out), name="logs")
    kwargs["default_root_dir"] = kwargs.get("default_root_dir") or str(out)
    given = kwargs.get("callbacks") or []
    kwargs["callbacks"] = [*(given if isinstance(given, list) else [given]), *(callbacks or [])]
    if kwargs.get("log_every_n_steps") is None and num_batches:
        # Lightning's 50 would log nothing (and warn) when an epoch is shorter than that
        kwargs["log_every_n_steps"] = max(1, min(50, num_batches))
    return L.Trainer(**kwargs)


def fit_tokenizer(model, data, *, out: str | Path, trainer: dict[str, Any] | None = None, overwrite: bool = False,
                  argv: list[str] | None = None, config_yaml: str | None = None) -> dict:  # fmt: skip
    """Train the tokenizer ``model`` (a ``LitTokenizer``) on ``data`` (an ``ImageDataModule``)
    and write ``tokenizer.ckpt``, ``metrics.json`` and ``reconstructions.png`` into the run
    folder ``out`` (a new or empty folder, or a previous tokenizer run with ``overwrite``)."""
    return _in_run_folder("fit-tokenizer", out, lambda o: _fit_tokenizer(model, data, o, trainer), "steps",
                          overwrite=overwrite, argv=argv, config_yaml=config_yaml)  # fmt: skip


def _in_run_folder(
    verb: str, out, train, count: str, *, overwrite: bool, argv, config_yaml
) -> dict:
    """``train(out)`` inside the claimed run folder of ``verb`` (its config written first; the
    status ``finished`` with the metrics' ``count`` after); returns its metrics."""
    from .runs import claim_run

    with claim_run(out, verb, overwrite=overwrite, argv=argv) as run:
        _write_config(Path(out), config_yaml)
        metrics = train(Path(out))
        run.set_status("finished", **{count: metrics[count]})
    return metrics


def _fit_tokenizer(model, data, out: Path, trainer: dict[str, Any] | None) -> dict:
    import torch

    from .checkpoint import atomic_torch_save, save_image_grid, tokenizer_checkpoint
    from .metrics import evaluate_tokenizer

    cfg = model.config
    data.image_size, data.channels = cfg.image_size, cfg.channels
    data.setup("fit")
    model.content = data.train_set.content
    t = _make_trainer({**_trainer_defaults("fit-tokenizer"), **(trainer or {})}, out,
                      num_batches=len(data.train_set) // data.batch_size)  # fmt: skip
    t0 = time.time()
    t.fit(model, datamodule=data)
    seconds = time.time() - t0
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = model.tokenizer.to(dev).eval()
    metrics: dict = {
        "train_seconds": round(seconds, 1),
        "steps": t.global_step,
        "device": _gpu_name(),
    }
    for split in ("val", "test"):
        m = evaluate_tokenizer(tok, data.dataset(split), device=dev)
        metrics[split] = m
        log.info("%s: psnr %.2f dB, codebook usage %.1f%%, perplexity %.1f", split, m["psnr"],
                 100 * m["codebook_usage"], m["perplexity"])  # fmt: skip
    metrics.update({k: metrics["val"][k] for k in ("psnr", "codebook_usage", "perplexity")})
    tok = tok.cpu()
    info = data.train_set.info
    ds_info = {"name": data.name, "fit": data.fit, "image_size": data.image_size,
               "num_classes": info.num_classes, "native_size": info.native_size}  # fmt: skip
    atomic_torch_save(
        tokenizer_checkpoint(tok, dataset=ds_info, metrics=metrics), out / "tokenizer.ckpt"
    )
    _write_json(out / "metrics.json", metrics)
    x = torch.stack([data.val_set[i][0] for i in range(min(16, len(data.val_set)))])
    with torch.no_grad():
        recon = tok.decode(tok.encode(x))
    save_image_grid(torch.cat([x, recon]), out / "reconstructions.png", nrow=len(x))
    log.info(
        "wrote %s (val psnr %.2f dB) in %.0f s", out / "tokenizer.ckpt", metrics["psnr"], seconds
    )
    return metrics


def fit(model, data, *, out: str | Path, trainer: dict[str, Any] | None = None, resume: bool = False,
        overwrite: bool = False, state_every: int | None = None, state_interval: float = 600.0,
        patience: int | None = None, argv: list[str] | None = None,
        config_yaml: str | None = None) -> dict:  # fmt: skip
    """Train the AR model ``model`` (a ``LitGPT``) on the code store of ``data`` (a
    ``CodeDataModule``) in the run folder ``out``; keeps ``model.ckpt`` at the best validation
    loss, the training state ``last.ckpt`` (at the first validation ``state_interval`` seconds
    after the last write, or after every ``state_every`` validations when given; at the end;
    on SIGINT/SIGTERM), and writes ``metrics.json`` (best and final validation bits/token, the
    curve, the cost report, ``status``). With ``patience`` N, training stops once N validations
    in a row have not improved on the best (early stopping; the schedule keeps its length).

    ``resume`` continues the run in ``out`` from its ``last.ckpt`` (the same validation curve as
    an uninterrupted run); ``overwrite`` replaces a previous fit run there. Raises
    :class:`~movegen.runs.RunInterrupted` after a signal (the state is saved) and
    :class:`~movegen.runs.TrainingDiverged` when the loss becomes non-finite.

    With several processes (DDP or FSDP over GPUs, ``--trainer.devices N``) every process runs
    this; the first one claims the run folder and writes every file, the others join it.
    ``strategy: fsdp`` is :class:`~movegen.lit.BlockFSDPStrategy` (a unit per transformer block)."""
    from .lit import BestCheckpoint, SafeCheckpointIO, TrainingState, diverged_message
    from .model import cost_report
    from .runs import TrainingDiverged, claim_run, join_run

    out = Path(out)
    data.check(model.config)  # a clear error before the folder is touched or anything trains
    settings = {**_trainer_defaults("fit"), **(trainer or {})}
    settings["strategy"] = _fit_strategy(
        settings.get("strategy", "auto"), settings.get("accelerator")
    )
    settings["plugins"] = [*(settings.get("plugins") or []), SafeCheckpointIO()]
    best = BestCheckpoint(out, data.store.header, patience=patience)
    state = TrainingState(out, every=state_every, interval_s=state_interval, best=best)
    # built before the folder is claimed (it writes nothing): it knows which process this is
    t = _make_trainer(settings, out, callbacks=[best, state], num_batches=data.steps_per_epoch())
    first = t.is_global_zero
    if first:
        claim = claim_run(out, "fit", resume=resume, overwrite=overwrite, argv=argv)
    else:
        claim = join_run(out, "fit", resume=resume)
    with claim as run:
        if first:
            _write_config(out, config_yaml, resume)
        if resume:
            log.info("resuming %s from %s", out, out / "last.ckpt")
        t.fit(model, datamodule=data, ckpt_path=str(out / "last.ckpt") if resume else None)
        bad = model.nonfinite_step()
        if bad is not None:
            best.write()
            raise TrainingDiverged(diverged_message(bad, best))
        if not best.history:
            raise ValueError(
                "training ran no validation; lower --trainer.val_check_interval or raise max_steps"
            )
        if state.saved_step != t.global_step:
            state.save(t, model)  # the final state, so a longer schedule can extend the run
        final = best.history[-1]
        metrics = {
            "status": "finished",
            "val_loss": best.best,
            "val_bits_per_token": best.best / math.log(2),
            "best_step": best.best_step,
            "final_val_loss": final["val_loss"],
            "final_val_bits_per_token": final["val_bits_per_token"],
            "steps": t.global_step,
            "stopped_early": best.stopped_early,
            "train_tokens": model.train_tokens,
            "train_seconds": round(state.train_seconds(), 1),
            "resumed": run.resumed,
            "device": _gpu_name(),
            "memory": model.config.memory,
            "memory_density": model.config.memory_density,
            **cost_report(model.config),
            "history": best.history,
        }
        if first:
            _write_json(out / "metrics.json", metrics)
        run.set_status("finished", steps=t.global_step)
    if first:
        log.info("best val %.4f bits/token at step %d (final %.4f); wrote %s", metrics["val_bits_per_token"],
                 best.best_step, final["val_bits_per_token"], out / "model.ckpt")  # fmt: skip
    return metrics


def _fit_strategy(strategy, accelerator):
    """``fit``'s training strategy: ``fsdp`` (the name) becomes movegen's FSDP strategy, a unit
    per transformer block; Lightning's own FSDP, which would shard without them, is refused."""
    import torch
    from lightning.pytorch.strategies import FSDPStrategy

    from .lit import BlockFSDPStrategy

    if strategy == "fsdp":
        strategy = BlockFSDPStrategy()
    named = isinstance(strategy, str) and strategy.startswith("fsdp")
    if named or (
        isinstance(strategy, FSDPStrategy) and not isinstance(strategy, BlockFSDPStrategy)
    ):
        raise ValueError(f"movegen fit shards with its own FSDP strategy (a unit per transformer block, fp32 shards "
                         f"under autocast, full checkpoints), not {strategy if named else type(strategy).__name__}: "
                         "pass --trainer.strategy fsdp, or for its options --trainer.strategy "
                         "movegen.lit.BlockFSDPStrategy --trainer.strategy.sharding_strategy ...")  # fmt: skip
    if isinstance(strategy, BlockFSDPStrategy) and (
        accelerator == "cpu" or not torch.cuda.is_available()
    ):
        raise ValueError("--trainer.strategy fsdp shards the model over CUDA GPUs (torch's FSDP needs them) and "
                         "this run has none; on CPUs train with --trainer.strategy ddp, or leave it auto")  # fmt: skip
    return strategy


def fit_classifier(model, data, *, out: str | Path, trainer: dict[str, Any] | None = None, overwrite: bool = False,
                   argv: list[str] | None = None, config_yaml: str | None = None) -> dict:  # fmt: skip
    """Train the evaluation classifier ``model`` (a ``LitClassifier``) on ``data`` (an
    ``ImageDataModule``); writes ``classifier.ckpt`` and ``metrics.json`` (val/test accuracy)
    into the run folder ``out`` (new or empty, or a previous classifier run with ``overwrite``)."""
    return _in_run_folder("fit-classifier", out, lambda o: _fit_classifier(model, data, o, trainer), "epochs",
                          overwrite=overwrite, argv=argv, config_yaml=config_yaml)  # fmt: skip


def _fit_classifier(model, data, out: Path, trainer: dict[str, Any] | None) -> dict:
    import torch

    from .checkpoint import atomic_torch_save, classifier_checkpoint
    from .metrics import classifier_accuracy

    data.setup("fit")
    info = data.train_set.info
    x0 = data.train_set[0][0]
    model.build(info.num_classes, x0.shape[0], x0.shape[-1])
    t = _make_trainer({**_trainer_defaults("fit-classifier"), **(trainer or {})}, out,
                      num_batches=len(data.train_set) // data.batch_size)  # fmt: skip
    t0 = time.time()
    t.fit(model, datamodule=data)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    net = model.net.eval()
    metrics = {"val_accuracy": classifier_accuracy(net, data.val_set, dev),
               "test_accuracy": classifier_accuracy(net, data.dataset("test"), dev),
               "train_seconds": round(time.time() - t0, 1), "epochs": t.current_epoch,
               "device": _gpu_name()}  # fmt: skip
    ckpt = classifier_checkpoint(net.cpu(), dataset=data.name, image_size=int(x0.shape[-1]),
                                 fit=data.fit, metrics=metrics)  # fmt: skip
    atomic_torch_save(ckpt, out / "classifier.ckpt")
    _write_json(out / "metrics.json", metrics)
    log.info("classifier on %s: test accuracy %.2f%% (val %.2f%%); wrote %s", data.name,
             100 * metrics["test_accuracy"], 100 * metrics["val_accuracy"], out / "classifier.ckpt")  # fmt: skip
    return metrics


def _train_cli_class():
    from lightning.pytorch.cli import LightningCLI

    class TrainCLI(LightningCLI):
        """The training verbs' parser: the module's and data's signatures, the trainer with the
        verb's defaults, ``--out``, and links in place of config patching. Builds no Trainer
        (the verb builds one, with the run folder); offers no optimizer switch."""

        def __init__(self, model_cls, dm_cls, *, verb: str, args: list[str], links=()):
            self._links, self._verb = links, verb
            super().__init__(
                model_cls,
                dm_cls,
                args=args,
                run=False,
                save_config_callback=None,
                seed_everything_default=0,
                trainer_defaults=_trainer_defaults(verb),
                auto_configure_optimizers=False,
                parser_kwargs={"prog": f"movegen {verb}", "description": VERBS[verb]},
            )

        def add_arguments_to_parser(self, parser):
            parser.add_argument("--out", required=True, help="the run folder this verb writes")
            parser.add_argument("--overwrite", type=bool, default=False,
                                help="replace a previous run of this verb in --out (only its own files)")  # fmt: skip
            if self._verb == "fit":
                parser.add_argument("--resume", type=bool, default=False,
                                    help="continue the run in --out from its last.ckpt")  # fmt: skip
                parser.add_argument("--state_every", type=int | None, default=None,
                                    help="write the training state last.ckpt (and model.ckpt) after every N "
                                         "validations (default: by --state_interval)")  # fmt: skip
                parser.add_argument("--state_interval", type=float, default=600.0,
                                    help="seconds between writes of the training state, at validations")  # fmt: skip
                parser.add_argument("--patience", type=int | None, default=None,
                                    help="stop early once N validations in a row have not improved on the "
                                         "best (model.ckpt keeps the best; default: train max_steps)")  # fmt: skip
            for source, target in self._links:
                parser.link_arguments(source, target)

        def instantiate_trainer(self, **kwargs):
            return None

    return TrainCLI


def _training_verb(verb: str, argv: list[str]) -> int:
    import torch

    from .data import CodeDataModule, ImageDataModule
    from .lit import LitClassifier, LitGPT, LitTokenizer

    run, model_cls, dm_cls, links = {
        "fit-tokenizer": (fit_tokenizer, LitTokenizer, ImageDataModule,
                          [("model.config.image_size", "data.image_size"),
                           ("model.config.channels", "data.channels")]),
        "fit": (fit, LitGPT, CodeDataModule, []),
        "fit-classifier": (fit_classifier, LitClassifier, ImageDataModule, []),
    }[verb]  # fmt: skip
    torch.set_float32_matmul_precision("high")
    _quiet_lightning()
    cli = _train_cli_class()(model_cls, dm_cls, verb=verb, args=argv, links=links)
    trainer = dict(cli.config_init.get("trainer", {}))
    extra = {
        k: cli.config[k]
        for k in ("resume", "state_every", "state_interval", "patience")
        if k in cli.config
    }
    run(cli.model, cli.datamodule, out=cli.config["out"], trainer=trainer, overwrite=cli.config["overwrite"],
        argv=argv, config_yaml=cli.parser.dump(cli.config, skip_none=False), **extra)  # fmt: skip
    return 0


# =========================================================================== typed verbs


@dataclass(frozen=True, kw_only=True)
class DataSource:
    """Where a verb reads images from."""

    name: str | None = None
    """Dataset: digits, fashion-mnist, mnist, cifar10 or folder:<path> (default: the one the
    tokenizer was trained on)."""
    root: str | None = None
    """Folder of torchvision datasets or of the (fashion-)mnist idx files."""


def extract_codes(
    *,
    tokenizer: str,
    out: str,
    split: Literal["train", "val", "test"] = "train",
    data: DataSource = DataSource(),
    views: int = 2,
    shifts: int | list[tuple[int, int]] = 0,
    ten_crop: bool = False,
    batch_size: int = 512,
    num_workers: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Encode a dataset split into a code store (one memory-mapped array and a JSON header).

    Args:
        tokenizer: DIR/tokenizer.ckpt from ``movegen fit-tokenizer``.
        out: the code store folder to write.
        split: which split to encode.
        data: the dataset (default: the tokenizer's) and its root folder.
        views: 2: each image and its horizontal flip; 1: the image only.
        shifts: extra translated views (each also flipped with views 2), the border filled with
            the background: 0 none; s the 8 neighbours at distance s pixels (1: 8 shifts, a
            store of 18 views with flips); or a list of (dy, dx), e.g. [[0, 2], [0, -2]].
            The store's header lists every view (view_list); view 0 is the original.
        ten_crop: LlamaGen's extraction augmentation (folder datasets): each image centre-cropped
            at 1.1 x the tokenizer's size, then the centre and the four corner crops at its
            size, each also flipped with views 2 (10 views; view 0 the centre crop). Not with
            shifts; held-out stores keep the plain view.
        batch_size: images per encoder batch.
        num_workers: DataLoader processes decoding the images (default: up to 8 for a folder
            dataset, 0 for the in-memory ones).
        device: 'auto' (a GPU when there is one), 'cpu' or 'cuda'. Under ``torchrun
            --nproc_per_node N`` each process (one GPU each) encodes its share of the batches
            and the first joins them: the same store as one process writes.
        overwrite: replace an existing store at ``out``.
    """
    from .checkpoint import ensure_writable, load_tokenizer, sha256_file
    from .data import extract_codes as _extract
    from .data import load_dataset, view_list

    n_views = len(
        view_list(views, shifts, crop=1 if ten_crop else None)
    )  # bad flags before any loading
    if Path(out).exists() and not overwrite:  # before any encoding
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    ensure_writable(Path(out).absolute().parent, f"--out {out}")
    from .ranks import agree, rank_and_world

    dev = _join_processes(_device(device))  # under torchrun: each process encodes its share
    rank, world = rank_and_world()

    def load():
        tok, ckpt = load_tokenizer(tokenizer, dev)
        name = data.name or ckpt["dataset"]["name"]
        if name.startswith("folder:"):  # a folder is found again from any working directory
            name = f"folder:{Path(name[7:]).expanduser().resolve()}"
        size = tok.config.image_size
        if ten_crop and not name.startswith("folder:"):
            raise ValueError(f"--ten_crop needs a folder dataset (ImageNet-style); {name} is {size}x{size} in memory: "
                             "use --shifts for translated views of it")  # fmt: skip
        ds = load_dataset(name, split, data_root=data.root, image_size=int(size * 1.1) if ten_crop else size,
                          fit=ckpt["dataset"].get("fit", "pad"), channels=tok.config.channels)  # fmt: skip
        return tok, ckpt, name, ds

    # an error loading in any process (a file one of them cannot read) is raised in every one
    tok, ckpt, name, ds = agree(load, "loading the tokenizer and dataset")
    crop = tok.config.image_size if ten_crop else None
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if name.startswith("folder:") else 0
    header = {"dataset": name, "split": split, "tokenizer_path": str(Path(tokenizer).resolve()),
              "tokenizer_sha256": sha256_file(tokenizer)}  # fmt: skip
    path = _extract(tok.encode, ds, out, codebook_size=tok.codebook_size,
                    num_classes=ds.info.num_classes, header=header, views=views, shifts=shifts, crop=crop,
                    batch_size=batch_size, num_workers=num_workers, device=dev, overwrite=overwrite,
                    progress=rank == 0, rank=rank, world=world)  # fmt: skip
    if rank == 0:
        log.info("wrote %s: %d items x %d views%s", path, len(ds), n_views,
                 f" ({world} processes)" if world > 1 else "")  # fmt: skip
    return path


def load_model_config(path: str):
    """The GPTConfig in a fit YAML (``model.config``)."""
    import yaml

    from .model import GPTConfig

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config {p} does not exist")
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark, ctx = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        where = f"{p}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(p)
        what = getattr(e, "problem", None) or str(e)
        if getattr(e, "context", None):
            what += f" ({e.context}" + (f" from line {ctx.line + 1})" if ctx else ")")
        raise ValueError(f"{where}: not valid YAML: {what}") from None
    cfg = (doc.get("model") or {}).get("config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{p} has no model.config section (a `movegen fit` config is expected)")
    try:
        return GPTConfig(**cfg)
    except TypeError as e:
        raise ValueError(f"{p}: bad model.config key: {e}") from e


def info(*, config: str, format: Literal["table", "json"] = "table") -> dict:
    """Parameters by kind, forward FLOPs per token and bank bytes per token of a model config.

    Args:
        config: a ``movegen fit`` YAML (configs/...); no data is read.
        format: 'table' for people, 'json' for one JSON object on one line.
    """
    from .model import cost_report

    cfg = load_model_config(config)
    rep = cost_report(cfg)
    if format == "json":
        print(json.dumps(rep))
        return rep
    print(f"{config}: memory={cfg.memory} density=x{cfg.memory_density:g} L={cfg.n_layer} d={cfg.n_embd} "
          f"H={cfg.n_head} K={cfg.vocab_size} C={cfg.num_classes} T={cfg.seq_len}")  # fmt: skip
    rows = [("backbone (non-embedding)", rep["params_backbone"]), ("embeddings (tok, cls, head)", rep["params_embedding"]),
            ("memory (bank / LaVE tables)", rep["params_memory"]), ("routers", rep["params_router"]),
            ("total", rep["params_total"])]  # fmt: skip
    for name, n in rows:
        print(f"  {name:30s} {n:>14,d}  ({n / 1e6:.2f} M)")
    f = rep["flops_per_token"]
    print(f"  {'forward FLOPs per token':30s} {f:>14,d}  ({f / 1e6:.1f} MFLOP)")
    b = rep["bank_bytes_per_token"]
    print(f"  {'bank bytes read per token':30s} {b:>14,d}  (bf16, all layers)")
    return rep


def _parse_classes(spec: str, num_classes: int) -> list[int]:
    if spec == "all":
        return list(range(num_classes))
    parts = [c.strip() for c in spec.split(",")]
    try:
        if any(not c for c in parts):
            raise ValueError
        classes = [int(c) for c in parts]
    except ValueError:
        raise ValueError(f"classes must be 'all' or comma-separated ints, got {spec!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(
            f"class ids {bad} out of range: this model has classes 0..{num_classes - 1}"
        )
    return classes


# what ``sample`` and ``evaluate`` draw with unless told otherwise: guidance 2.0, temperature 1
CLI_SAMPLING = SamplingSettings(cfg_scale=2.0)


def sample(
    *,
    model: str,
    out: str = "grid.png",
    classes: str = "all",
    per_class: int = 8,
    sampling: SamplingSettings = CLI_SAMPLING,
    seed: int = 0,
    batch_size: int = 256,
    tokenizer: str | None = None,
    out_dir: str | None = None,
    device: str = "auto",
) -> Path:
    """Sample a PNG grid from a trained model: one row per class.

    Args:
        model: DIR/model.ckpt from ``movegen fit``.
        out: the PNG grid to write.
        classes: 'all' or comma-separated class ids, e.g. 0,3,7.
        per_class: images per class (the grid's columns).
        sampling: guidance, temperature, top-k, top-p.
        seed: seed of the sampling noise: image j depends only on (seed, j), not on the batch size or device.
        batch_size: images sampled at once.
        tokenizer: a tokenizer.ckpt to decode with instead of the one the checkpoint records.
        out_dir: also save every image as its own PNG in this folder.
        device: 'auto' (a GPU when there is one), 'cpu' or 'cuda'.
    """
    import torch

    from .checkpoint import ensure_writable, load_model_and_tokenizer, save_image_grid
    from .sample import SampleNoise, generate_images

    if per_class < 1 or batch_size < 1:
        raise ValueError(f"per_class and batch_size must be >= 1, got {per_class} and {batch_size}")
    ensure_writable(Path(out).absolute().parent, f"--out {out}")
    if out_dir:
        ensure_writable(out_dir, f"--out_dir {out_dir}")
    dev = _device(device)
    net, _, tok, _ = load_model_and_tokenizer(model, tokenizer, dev)
    ids = _parse_classes(classes, net.config.num_classes)
    labels = torch.tensor(ids, device=dev).repeat_interleave(per_class)
    images, _ = generate_images(net, tok.decode, labels, sampling, batch_size=batch_size,
                                noise=SampleNoise(seed), progress=True)  # fmt: skip
    save_image_grid(images, out, nrow=per_class)
    if out_dir:
        od = Path(out_dir)
        for i, (img, c) in enumerate(zip(images, labels.tolist())):
            save_image_grid(
                img[None], od / f"class{c:04d}_{i % per_class:04d}.png", nrow=1, min_tile=1
            )
    log.info("wrote %s (%d classes x %d)", out, len(ids), per_class)
    return Path(out)


def _print_table(rows: list[dict]) -> None:
    cols = [
        "run",
        "memory",
        "memory_density",
        "fid",
        "is",
        "kid",
        "fid_train",
        "memorisation",
        "val_bits_per_token",
        "params_total",
    ]
    print(" | ".join(f"{c:>18s}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            v = v.get("memorisation") if isinstance(v, dict) else v
            cells.append(f"{v:18.4f}" if isinstance(v, float) else f"{v!s:>18s}")
        print(" | ".join(cells))


def evaluate(
    *,
    model: list[str] | str,
    features: str,
    out: str,
    num_samples: int = 10_000,
    sampling: SamplingSettings = CLI_SAMPLING,
    seed: int = 0,
    batch_size: int = 256,
    ref_splits: tuple[Literal["train", "val", "test"], ...] | None = None,
    reference: str | None = None,
    data: DataSource = DataSource(),
    tokenizer: str | None = None,
    val_codes: str | None = None,
    inception_weights: str | None = None,
    cache_dir: str | None = None,
    export_npz: bool = False,
    compile_decoder: bool = False,
    device: str = "auto",
    overwrite: bool = False,
) -> list[dict]:
    """FID / IS / KID of samples against real images, and validation bits per token; one
    ``<run>.json`` per model in ``out`` (the run is the model's folder name).

    Args:
        model: one DIR/model.ckpt, or a list of them: '[A/model.ckpt, B/model.ckpt]'.
        features: 'inception' or 'classifier:DIR/classifier.ckpt' (from ``movegen fit-classifier``).
        out: the results folder.
        num_samples: images per model, balanced over the classes.
        sampling: guidance, temperature, top-k, top-p of the samples.
        seed: seed of the sampling noise (each sample's depends only on the seed and its index).
        batch_size: images sampled at once.
        ref_splits: the real images to compare with, e.g. '[test, train]' (the default without
            --reference; none with it): the first (the held-out split) gives the primary
            fid/kid/precision/recall, each other split its own (fid_train, ...); with train and
            a held-out split, the memorisation score is computed too.
        reference: an ADM evaluator reference batch (.npz with mu, sigma[, mu_s, sigma_s,
            arr_0], e.g. VIRTUAL_imagenet256_labeled.npz): the primary reference ('adm'), FID
            from its statistics, sFID from mu_s/sigma_s, KID and precision/recall against its
            arr_0 images. Needs --features inception.
        data: the root folder of the reference dataset (its name comes from the model's tokenizer).
        tokenizer: a tokenizer.ckpt to decode with instead of the one the checkpoint records.
        val_codes: recompute bits/token on this held-out code store.
        inception_weights: path of the torch-fidelity Inception weights file (features 'inception').
        cache_dir: reference-statistics cache (default ~/.cache/movegen/ref).
        export_npz: also write OUT/<run>.npz (the ADM evaluator's layout).
        compile_decoder: compile the tokenizer's decoder (inductor, channels-last; once per
            process): LlamaGen's VQ-16 decoded 1.88 x as many images/s on an H100, the same
            images to within TF32's differences (its compilation not timed).
        device: 'auto' (a GPU when there is one), 'cpu' or 'cuda'. Under ``torchrun
            --nproc_per_node N`` each process samples 1/N of the images (on its own GPU) and
            the first scores them all: the same images and numbers as one process.
        overwrite: replace existing results of these runs in ``out`` (else they are refused
            before any sampling; other runs' results in ``out`` are never touched).
    """
    from .checkpoint import ensure_writable
    from .evaluate import evaluate_model, preflight

    models = [model] if isinstance(model, str) else list(model)
    if not models:
        raise ValueError("give at least one model: --model DIR/model.ckpt")
    if num_samples < 2 or batch_size < 1:
        raise ValueError(f"num_samples must be >= 2 (FID/KID compare two sets) and batch_size >= 1, got "
                         f"{num_samples} and {batch_size}")  # fmt: skip
    ensure_writable(out, f"--out {out}")
    dev = _join_processes(_device(device))
    out_dir = Path(out)
    names = [Path(m).resolve().parent.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"two models share a run name (their folder names: {names}); results are written as "
                         "<run>.json, so evaluate them in separate calls with different --out folders")  # fmt: skip
    taken = [f"{run}.json" for run in names if (out_dir / f"{run}.json").exists()]
    if taken and not overwrite:
        raise FileExistsError(f"{out_dir} already holds results of {', '.join(taken)}; pass --overwrite true to "
                              "replace them, or choose another --out")  # fmt: skip
    if len(models) > 1:  # every model's inputs checked before the first is sampled
        for m in models:
            preflight(m, features=features, tokenizer=tokenizer, val_codes=val_codes,
                      inception_weights=inception_weights)  # fmt: skip
    rows = []
    for m, run in zip(models, names):
        r = evaluate_model(m, features=features, num_samples=num_samples, settings=sampling, seed=seed,
                           device=dev, batch_size=batch_size, tokenizer=tokenizer, ref_splits=ref_splits,
                           cache_dir=cache_dir, inception_weights=inception_weights, data_root=data.root,
                           val_codes=val_codes, export_npz=out_dir / f"{run}.npz" if export_npz else None,
                           reference=reference, compile_decoder=compile_decoder)  # fmt: skip
        if r is None:  # another process of a run over several: the first one writes
            continue
        _write_json(out_dir / f"{run}.json", r)
        rows.append(r)
    if rows:
        _print_table(rows)
    return rows


def _join_processes(device: str) -> str:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group (NCCL on GPUs, gloo on
    CPUs) and return this process's device; otherwise ``device`` unchanged. Each process then
    samples its share of the images, the first one scores them all."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (
        dist.is_available() and dist.is_initialized()
    ):
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def report(*, results: str, out: str) -> Path:
    """A markdown table and plots (FID against training FLOPs, parameters and memory slots) from
    the result files of ``movegen evaluate``.

    Args:
        results: folder of <run>.json files from ``movegen evaluate``.
        out: the report folder (README.md and PNG plots).
    """
    from .report import write_report

    path = write_report(results, out)
    log.info("wrote %s", path)
    return path


def study(*, config: str, out: str, parallel: int | None = None, inputs: str | None = None,
          arms: list[str] | None = None, stop_fits_after: float | None = None,
          plan: bool = False) -> Path | None:  # fmt: skip
    """Train every arm x grid point x budget x seed of a study, evaluate every run, and write
    OUT/study.json and OUT/report/ (tables with mean ± sd and paired differences, targets, plots).
    Runs are subprocesses (logs in OUT/logs/); a second call resumes: finished runs are never
    trained or evaluated again.

    Args:
        config: a study YAML (configs/studies/...).
        out: the study folder (inputs, runs, logs, study.json, report).
        parallel: subprocesses at once (default: the YAML's, else one per visible GPU, else 1).
        inputs: take the tokenizer, code stores and classifier from this folder (an earlier
            study's OUT/inputs: tokenizer/tokenizer.ckpt, codes-train, codes-val,
            classifier/classifier.ckpt) instead of building them from the YAML's recipes.
        arms: train and evaluate only these arms (the standard arm always); a later call with
            all arms adds the others and keeps these.
        stop_fits_after: start no fit after this many seconds, while the fits running then go
            on and every finished fit is still evaluated; for a time slot (a cluster's time
            limit, a lent GPU): set it a fit's length before the end, and a finished fit is never
            left unevaluated. A rerun goes on with the rest.
        plan: print what this call would do with each run (settled, evaluate, resume, fit...)
            and the inputs it would build, and do nothing.
    """
    from .study import run_study

    if plan:
        p = run_study(config, out, parallel=parallel, inputs=inputs, arms=arms, plan=True)
        print("| run | action |\n|---|---|")
        for row in p["plan"]:
            print(f"| {row['id']} | {row['action']} |")
        print(f"\n{p['fits']} fit(s) and {p['evaluations']} evaluation(s) to run"
              + (f"; inputs to build: {', '.join(p['inputs'])}" if p["inputs"] else ""))  # fmt: skip
        return None
    run_study(
        config, out, parallel=parallel, inputs=inputs, arms=arms, stop_fits_after=stop_fits_after
    )
    path = Path(out) / "report" / "README.md"
    log.info("wrote %s", path)
    return path


def _repo_file(rel: str) -> Path:
    p = Path(__file__).resolve().parents[1] / rel
    if not p.exists():
        raise FileNotFoundError(
            f"{rel} not found next to the package; run the demo from a clone of the repository"
        )
    return p


def _from_yaml(path: Path, model_cls, config_cls, dm_cls, *, seed: int | None = None, data: dict | None = None,
               trainer: dict | None = None):  # fmt: skip
    """Build a training verb's module, data module and trainer settings from its YAML, as the
    parser would (``model.config`` into ``config_cls``), with overrides; seeds with ``seed``, else
    as the YAML says."""
    import lightning as L
    import yaml

    doc = yaml.safe_load(Path(path).read_text()) or {}
    L.seed_everything(seed if seed is not None else doc.get("seed_everything", 0), verbose=False)
    m = dict(doc.get("model") or {})
    model = model_cls(config=config_cls(**m.pop("config")), **m) if config_cls else model_cls(**m)
    dm = dm_cls(**{**(doc.get("data") or {}), **(data or {})})
    return (
        model,
        dm,
        {**(doc.get("trainer") or {}), **(trainer or {})},
    )  # the verb adds its defaults


def demo(
    *,
    out: str = "runs/demo",
    tokenizer_steps: int = 400,
    model_steps: int = 400,
    classifier_epochs: int = 30,
    num_samples: int = 1000,
    cfg_scale: float = 2.0,
    grid_cfg_scale: float = 3.0,
    grid_temperature: float = 0.8,
    grid_top_k: int = 10,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """The whole pipeline on the embedded digits data: tokenizer -> codes -> a standard and a
    MoVE model -> evaluation classifier -> FID/IS/KID -> a grid and a report.

    Args:
        out: the output folder.
        tokenizer_steps: tokenizer training steps.
        model_steps: training steps of each AR model.
        classifier_epochs: epochs of the evaluation classifier.
        num_samples: images per model for FID/IS/KID.
        cfg_scale: guidance of the evaluation samples.
        grid_cfg_scale: guidance of the grid.
        grid_temperature: temperature of the grid.
        grid_top_k: top-k of the grid.
        seed: seed of every stage.
        overwrite: replace a previous demo in ``out`` (each stage replaces only its own files).
    """
    from .data import CodeDataModule, ImageDataModule
    from .lit import LitClassifier, LitGPT, LitTokenizer
    from .model import GPTConfig
    from .sample import SamplingSettings
    from .tokenizer import TokenizerConfig

    root = Path(out)
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"{root} is not empty (a previous demo?); pass --overwrite true to replace it, or "
                              "choose another --out")  # fmt: skip
    ow = {"overwrite": overwrite}
    t0 = time.time()
    bar = {"enable_progress_bar": True}
    tok = root / "tokenizer"
    log.info("demo: 1/6 tokenizer")
    m, dm, tr = _from_yaml(_repo_file("tokenizers/digits/config.yaml"), LitTokenizer, TokenizerConfig,
                           ImageDataModule, seed=seed, trainer={"max_steps": tokenizer_steps, **bar})  # fmt: skip
    tokm = fit_tokenizer(m, dm, out=tok, trainer=tr, **ow)
    for split in ("train", "val"):
        log.info("demo: 2/6 codes (%s)", split)
        extract_codes(tokenizer=str(tok / "tokenizer.ckpt"), split=split,
                      out=str(root / f"codes-{split}"), overwrite=True, device="cpu")  # fmt: skip
    arms = ["standard", "move-x1"]
    for arm in arms:
        log.info("demo: 3/6 model %s", arm)
        m, dm, tr = _from_yaml(_repo_file(f"configs/digits/{arm}.yaml"), LitGPT, GPTConfig, CodeDataModule,
                               data={"codes": str(root / "codes-train"), "val_codes": str(root / "codes-val")},
                               seed=seed, trainer={"max_steps": model_steps, **bar})  # fmt: skip
        fit(m, dm, out=root / arm, trainer=tr, **ow)
    log.info("demo: 4/6 classifier")
    import lightning as L

    L.seed_everything(seed, verbose=False)
    clsm = fit_classifier(LitClassifier(), ImageDataModule(name="digits", batch_size=64),
                          out=root / "classifier",
                          trainer={"max_epochs": classifier_epochs}, **ow)  # fmt: skip
    log.info("demo: 5/6 evaluation")
    rows = evaluate(model=[str(root / arm / "model.ckpt") for arm in arms],
                    features=f"classifier:{root / 'classifier' / 'classifier.ckpt'}",
                    num_samples=num_samples, sampling=SamplingSettings(cfg_scale=cfg_scale), seed=seed,
                    cache_dir=str(root / "cache"), out=str(root / "results"), device="cpu", **ow)  # fmt: skip
    log.info("demo: 6/6 grid and report")
    grid = SamplingSettings(
        cfg_scale=grid_cfg_scale, temperature=grid_temperature, top_k=grid_top_k
    )
    sample(model=str(root / "move-x1" / "model.ckpt"), classes="all", per_class=10, sampling=grid,
           seed=seed, out=str(root / "grid.png"), device="cpu")  # fmt: skip
    report(results=str(root / "results"), out=str(root / "report"))
    print(f"\nmovegen demo finished in {time.time() - t0:.0f} s -> {root}/")
    print(
        f"  tokenizer: val PSNR {tokm['psnr']:.2f} dB, codebook usage {100 * tokm['codebook_usage']:.0f}%"
    )
    print(f"  classifier (FID/IS/KID features): test accuracy {100 * clsm['test_accuracy']:.1f}%")
    for arm, r in zip(arms, rows):
        print(f"  {arm:9s} val {r['val_bits_per_token']:.3f} bits/token  FID {r['fid']:.2f}  IS {r['is']:.2f}  "
              f"KID {r['kid']:.4f}  ({r['params_total'] / 1e6:.2f} M params)")  # fmt: skip
    print(
        f"  FID/IS/KID: {num_samples} samples per model, CFG {cfg_scale}, temperature 1, classifier features"
    )
    print(f"  grid of MoVE samples (one row per class; CFG {grid_cfg_scale}, temperature "
          f"{grid_temperature}, top-k {grid_top_k}): {root / 'grid.png'}")  # fmt: skip
    print(f"  report: {root / 'report' / 'README.md'}")
    return {"tokenizer": tokm, "classifier": clsm, "results": rows}


TYPED_VERBS = {
    "extract-codes": extract_codes,
    "info": info,
    "sample": sample,
    "evaluate": evaluate,
    "study": study,
    "report": report,
    "demo": demo,
}
TRAINING_VERBS = ("fit-tokenizer", "fit", "fit-classifier")
CONVERTERS = {"llamagen-vq": "convert_llamagen_vq", "llamagen-gpt": "convert_llamagen_gpt"}
COMMANDS = sorted([*TYPED_VERBS, *TRAINING_VERBS, "convert"], key=list(VERBS).index)


def _typed_verb(verb: str, argv: list[str]) -> int:
    from jsonargparse import ActionConfigFile, ArgumentParser

    if verb == "convert":  # `movegen convert KIND ...`: one typed function per kind
        from . import convert

        if not argv or argv[0] not in CONVERTERS:
            raise ValueError(f"usage: movegen convert {{{','.join(CONVERTERS)}}} --help")
        fn, verb, argv = getattr(convert, CONVERTERS[argv[0]]), f"convert {argv[0]}", argv[1:]
    else:
        fn = TYPED_VERBS[verb]
    params = inspect.signature(fn).parameters
    parser = ArgumentParser(
        prog=f"movegen {verb}", description=inspect.getdoc(fn).split("\n\nArgs:")[0]
    )
    if "config" not in params:  # (``info`` has a --config of its own: the fit YAML it describes)
        parser.add_argument("--config", action=ActionConfigFile, help="a YAML of these arguments")
    parser.add_function_arguments(fn, as_group=False)
    init = parser.instantiate(parser.parse_args(argv))
    fn(**{k: init[k] for k in params})
    return 0


# =========================================================================== main


def main(argv: list[str] | None = None) -> int:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="movegen",
        description="Class-conditional image generation over VQ tokens with MoVE (Mixture of Value Embeddings).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands:\n"
        + "\n".join(f"  {k:15s} {v}" for k, v in VERBS.items())
        + "\n\n`movegen <subcommand> --help` explains each.",
    )
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, type=str.upper)
    p.add_argument("subcommand", choices=COMMANDS, metavar="subcommand")
    if not argv or argv[0] in ("-h", "--help"):
        p.print_help()
        return 0
    n = 1  # the words before the verb's own arguments: [--log-level L] verb
    if argv[0] == "--log-level":
        n = 3
    elif argv[0].startswith("--log-level="):
        n = 2
    a = p.parse_args(argv[:n])
    rest = argv[n:]
    _setup_logging(a.log_level)
    _quiet_third_party()
    import jsonargparse

    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    from .runs import RunError

    try:
        if a.subcommand in TRAINING_VERBS:
            return _training_verb(a.subcommand, rest)
        return _typed_verb(a.subcommand, rest)
    except RunError as e:
        log.error("%s", e)
        return e.exit_code
    except (FileNotFoundError, FileExistsError, ValueError, PermissionError) as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; files written so far are complete (every write is atomic)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
