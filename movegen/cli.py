"""The ``movegen`` console script. The only module that configures logging and parses arguments.

Training verbs (``fit-tokenizer``, ``fit``, ``fit-classifier``) go through Lightning's
``LightningCLI``: ``--config YAML``, dotted overrides (``--trainer.max_steps 200``) and
``--print_config`` all work. Other verbs are plain typed functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

log = logging.getLogger("movegen")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"

VERBS = {
    "fit-tokenizer": "train a VQ tokenizer (LightningCLI: --config tokenizers/<name>/config.yaml --out DIR)",
    "extract-codes": "encode a dataset split into a code store",
    "fit": "train an AR model on a code store (LightningCLI: --config configs/... --codes CODES --out DIR)",
    "info": "parameters, FLOPs per token and bank bytes of a model config (no data needed)",
    "sample": "sample a PNG grid (one row per class) from a trained model",
    "fit-classifier": "train the small CNN whose features score FID/IS/KID offline",
    "evaluate": "FID / IS / KID and validation bits per token of one or more models",
    "report": "turn evaluation results into a markdown table and plots",
    "demo": "the whole pipeline on the embedded digits data",
}


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip
    for noisy in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _device(name: str = "auto") -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# =========================================================================== fit-tokenizer


def _lightning_cli(
    model_cls, dm_cls, argv: list[str], prog: str, extra_args, trainer_defaults: dict | None = None
):
    from lightning.pytorch.cli import LightningCLI

    class CLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            extra_args(parser)

    return CLI(
        model_cls,
        dm_cls,
        args=argv,
        run=False,
        save_config_callback=None,
        seed_everything_default=0,
        trainer_defaults={
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
        },
        parser_kwargs={"prog": prog, "description": VERBS[prog.split()[-1]]},
    )


def _make_trainer(cli, out: Path, **overrides):
    """Rebuild the parsed Trainer with our output folder and logger."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    kwargs = dict(cli.config_init.get("trainer", {}))
    # instantiated callbacks/loggers from the config are kept as objects
    kwargs = {k: v for k, v in kwargs.items() if k not in ("logger", "default_root_dir")}
    kwargs.update(overrides)
    return L.Trainer(default_root_dir=str(out), logger=CSVLogger(str(out), name="logs"), **kwargs)


def cmd_fit_tokenizer(argv: list[str]) -> int:
    import torch

    from .data import atomic_torch_save, atomic_write_text, save_image_grid
    from .lit import ImageDataModule, LitTokenizer, evaluate_tokenizer, tokenizer_checkpoint

    def extra(parser):
        parser.add_argument(
            "--out",
            required=True,
            help="output folder (tokenizer.ckpt, metrics.json, reconstructions.png)",
        )

    torch.set_float32_matmul_precision("high")
    cli = _lightning_cli(LitTokenizer, ImageDataModule, argv, "movegen fit-tokenizer", extra)
    out = Path(cli.config["out"])
    out.mkdir(parents=True, exist_ok=True)
    model: LitTokenizer = cli.model
    dm: ImageDataModule = cli.datamodule
    cfg = model.config
    dm.image_size = dm.image_size or cfg.image_size
    dm.channels = dm.channels or cfg.channels
    if dm.image_size != cfg.image_size or dm.channels != cfg.channels:
        raise SystemExit(
            f"data.image_size/channels ({dm.image_size}, {dm.channels}) disagree with the tokenizer's "
            f"({cfg.image_size}, {cfg.channels}); leave the data ones unset"
        )
    dm.setup("fit")
    model.content = dm.train_set.content
    trainer = _make_trainer(cli, out, enable_checkpointing=False)
    t0 = time.time()
    trainer.fit(model, datamodule=dm)
    seconds = time.time() - t0
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = model.tokenizer.to(dev).eval()
    metrics: dict = {"train_seconds": round(seconds, 1), "steps": trainer.global_step,
                     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}  # fmt: skip
    for split in ("val", "test"):
        m = evaluate_tokenizer(tok, dm.dataset(split), device=dev)
        metrics[split] = m
        log.info("%s: psnr %.2f dB, codebook usage %.1f%%, perplexity %.1f", split, m["psnr"],
                 100 * m["codebook_usage"], m["perplexity"])  # fmt: skip
    metrics.update({k: metrics["val"][k] for k in ("psnr", "codebook_usage", "perplexity")})
    tok = tok.cpu()
    ds_info = {
        "name": dm.name,
        "fit": dm.fit,
        "image_size": dm.image_size,
        "num_classes": dm.train_set.info.num_classes,
        "native_size": dm.train_set.info.native_size,
    }
    atomic_torch_save(
        tokenizer_checkpoint(tok, dataset=ds_info, metrics=metrics), out / "tokenizer.ckpt"
    )
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    x = torch.stack([dm.val_set[i][0] for i in range(min(16, len(dm.val_set)))])
    with torch.no_grad():
        recon = tok.decode(tok.encode(x))
    save_image_grid(torch.cat([x, recon]), out / "reconstructions.png", nrow=len(x))
    log.info(
        "wrote %s (val psnr %.2f dB) in %.0f s", out / "tokenizer.ckpt", metrics["psnr"], seconds
    )
    return 0


# =========================================================================== extract-codes


def cmd_extract_codes(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="movegen extract-codes", description=VERBS["extract-codes"])
    p.add_argument("--tokenizer", required=True, help="DIR/tokenizer.ckpt from fit-tokenizer")
    p.add_argument("--data", default=None, help="dataset name (default: the tokenizer's)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument(
        "--views", type=int, default=2, help="2: original + horizontal flip; 1: original only"
    )
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--out", required=True, help="code store folder")
    a = p.parse_args(argv)
    from .data import extract_codes, load_dataset, sha256_file
    from .lit import load_tokenizer

    dev = _device(a.device)
    tok, ckpt = load_tokenizer(a.tokenizer, dev)
    name = a.data or ckpt["dataset"]["name"]
    ds = load_dataset(name, a.split, data_root=a.data_root, image_size=tok.config.image_size,
                      fit=ckpt["dataset"].get("fit", "pad"), channels=tok.config.channels)  # fmt: skip
    header = {"dataset": name, "split": a.split, "tokenizer_path": str(Path(a.tokenizer).resolve()),
              "tokenizer_sha256": sha256_file(a.tokenizer)}  # fmt: skip
    path = extract_codes(tok.encode, ds, a.out, codebook_size=tok.codebook_size,
                         num_classes=ds.info.num_classes, header=header, views=a.views,
                         batch_size=a.batch_size, device=dev, overwrite=a.overwrite)  # fmt: skip
    log.info("wrote %s: %d items x %d views", path, len(ds), a.views)
    return 0


# =========================================================================== fit / info


def _rename_flags(argv: list[str], mapping: dict[str, str]) -> list[str]:
    out = []
    for a in argv:
        key, eq, val = a.partition("=")
        out.append(mapping.get(key, key) + eq + val if key in mapping else a)
    return out


def cmd_fit(argv: list[str]) -> int:
    import torch

    from .data import atomic_write_text
    from .lit import BestCheckpoint, CodeDataModule, LitGPT
    from .model import cost_report

    def extra(parser):
        parser.add_argument(
            "--out",
            required=True,
            help="output folder (model.ckpt at best validation, metrics.json)",
        )

    argv = _rename_flags(argv, {"--codes": "--data.codes", "--val-codes": "--data.val_codes"})
    torch.set_float32_matmul_precision("high")
    # DESIGN defaults without a config: clip 1.0, bf16 mixed precision on GPU
    defaults = {
        "gradient_clip_val": 1.0,
        "precision": "bf16-mixed" if torch.cuda.is_available() else "32-true",
    }
    cli = _lightning_cli(LitGPT, CodeDataModule, argv, "movegen fit", extra, defaults)
    out = Path(cli.config["out"])
    out.mkdir(parents=True, exist_ok=True)
    model: LitGPT = cli.model
    dm: CodeDataModule = cli.datamodule
    dm.check(model.config)  # clear error before any training
    best = BestCheckpoint(out, dm.store.header)
    trainer = _make_trainer(cli, out, callbacks=[best])
    t0 = time.time()
    trainer.fit(model, datamodule=dm)
    seconds = time.time() - t0
    if not best.history:
        raise ValueError(
            "training ran no validation; lower --trainer.val_check_interval or raise max_steps"
        )
    final = best.history[-1]
    metrics = {
        "val_loss": best.best,
        "val_bits_per_token": best.best / math.log(2),
        "best_step": best.best_step,
        "final_val_loss": final["val_loss"],
        "final_val_bits_per_token": final["val_bits_per_token"],
        "steps": trainer.global_step,
        "train_tokens": model.train_tokens,
        "train_seconds": round(seconds, 1),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "memory": model.config.memory,
        "memory_density": model.config.memory_density,
        **cost_report(model.config),
        "history": best.history,
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    log.info("best val %.4f bits/token at step %d (final %.4f); wrote %s", metrics["val_bits_per_token"],
             best.best_step, final["val_bits_per_token"], out / "model.ckpt")  # fmt: skip
    return 0


def load_model_config(path: str):
    """The GPTConfig in a fit YAML (``model.config``)."""
    import yaml

    from .model import GPTConfig

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config {p} does not exist")
    doc = yaml.safe_load(p.read_text()) or {}
    cfg = (doc.get("model") or {}).get("config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{p} has no model.config section (a `movegen fit` config is expected)")
    try:
        return GPTConfig(**cfg)
    except TypeError as e:
        raise ValueError(f"{p}: bad model.config key: {e}") from e


def cmd_info(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="movegen info", description=VERBS["info"])
    p.add_argument("--config", required=True, help="a `movegen fit` YAML (configs/...)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    from .model import cost_report

    cfg = load_model_config(a.config)
    rep = cost_report(cfg)
    if a.json:
        print(json.dumps(rep))
        return 0
    print(f"{a.config}: memory={cfg.memory} density=x{cfg.memory_density:g} L={cfg.n_layer} d={cfg.n_embd} "
          f"H={cfg.n_head} K={cfg.vocab_size} C={cfg.num_classes} T={cfg.seq_len}")  # fmt: skip
    rows = [("backbone (non-embedding)", rep["params_backbone"]), ("embeddings (tok, cls, head)", rep["params_embedding"]),
            ("memory (bank / LaVE tables)", rep["params_memory"]), ("routers", rep["params_router"]),
            ("total", rep["params_total"])]  # fmt: skip
    for name, n in rows:
        print(f"  {name:30s} {n:>14,d}  ({n / 1e6:.2f} M)")
    print(
        f"  {'forward FLOPs per token':30s} {rep['flops_per_token']:>14,d}  ({rep['flops_per_token'] / 1e6:.1f} MFLOP)"
    )
    print(
        f"  {'bank bytes read per token':30s} {rep['bank_bytes_per_token']:>14,d}  (bf16, all layers)"
    )
    return 0


# =========================================================================== fit-classifier


def cmd_fit_classifier(argv: list[str]) -> int:
    import torch

    from .data import atomic_torch_save, atomic_write_text
    from .lit import (
        CKPT_FORMAT_CLASSIFIER,
        ImageDataModule,
        LitClassifier,
        classifier_accuracy,
        package_version,
    )

    def extra(parser):
        parser.add_argument(
            "--out", required=True, help="output folder (classifier.ckpt, metrics.json)"
        )

    # `--data NAME` is a shortcut for `--data.name NAME`
    fixed = []
    i = 0
    while i < len(argv):
        if (
            argv[i] == "--data"
            and i + 1 < len(argv)
            and not argv[i + 1].endswith((".yaml", ".yml", "}"))
        ):
            fixed += ["--data.name", argv[i + 1]]
            i += 2
            continue
        fixed.append(argv[i])
        i += 1
    torch.set_float32_matmul_precision("high")
    cli = _lightning_cli(LitClassifier, ImageDataModule, fixed, "movegen fit-classifier", extra,
                         {"max_epochs": 6, "enable_progress_bar": False})  # fmt: skip
    out = Path(cli.config["out"])
    out.mkdir(parents=True, exist_ok=True)
    dm: ImageDataModule = cli.datamodule
    dm.setup("fit")
    info = dm.train_set.info
    x0 = dm.train_set[0][0]
    model: LitClassifier = cli.model
    model.build(info.num_classes, x0.shape[0], x0.shape[-1])
    trainer = _make_trainer(cli, out)
    t0 = time.time()
    trainer.fit(model, datamodule=dm)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    net = model.net.eval()
    metrics = {"val_accuracy": classifier_accuracy(net, dm.val_set, dev),
               "test_accuracy": classifier_accuracy(net, dm.dataset("test"), dev),
               "train_seconds": round(time.time() - t0, 1), "epochs": trainer.current_epoch,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}  # fmt: skip
    net = net.cpu()
    ckpt = {"format": CKPT_FORMAT_CLASSIFIER, "movegen_version": package_version(), "hparams": net.hparams(),
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "dataset": dm.name,
            "image_size": int(x0.shape[-1]), "fit": dm.fit, "metrics": metrics}  # fmt: skip
    atomic_torch_save(ckpt, out / "classifier.ckpt")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    log.info("classifier on %s: test accuracy %.2f%% (val %.2f%%); wrote %s", dm.name, 100 * metrics["test_accuracy"],
             100 * metrics["val_accuracy"], out / "classifier.ckpt")  # fmt: skip
    return 0


# =========================================================================== sample


def _parse_classes(spec: str, num_classes: int) -> list[int]:
    if spec == "all":
        return list(range(num_classes))
    try:
        classes = [int(c) for c in spec.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--classes must be 'all' or comma-separated ints, got {spec!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(
            f"class ids {bad or spec} out of range: this model has classes 0..{num_classes - 1}"
        )
    return classes


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cfg-scale", type=float, default=2.0, help="classifier-free guidance scale (1 = none)"
    )
    p.add_argument("--cfg-interval", default=None, help="guide only code positions a:b (e.g. 0:32)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")


def _settings(a):
    """The sampling flags as a ``SamplingSettings`` (which rejects bad values with a ValueError)."""
    from .sample import SamplingSettings

    interval = None
    if a.cfg_interval:
        lo, hi = a.cfg_interval.split(":")
        interval = (int(lo), int(hi))
    return SamplingSettings(cfg_scale=a.cfg_scale, cfg_interval=interval, temperature=a.temperature, top_k=a.top_k,
                            top_p=a.top_p)  # fmt: skip


def cmd_sample(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="movegen sample", description=VERBS["sample"])
    p.add_argument("--model", required=True, help="DIR/model.ckpt from `movegen fit`")
    p.add_argument(
        "--tokenizer", default=None, help="override the tokenizer recorded in the checkpoint"
    )
    p.add_argument(
        "--classes", default="all", help="'all' or comma-separated class ids, e.g. 0,3,7"
    )
    p.add_argument("--per-class", type=int, default=8, help="images per class (one row per class)")
    _add_sampling_args(p)
    p.add_argument("--out", default="grid.png", help="PNG grid")
    p.add_argument("--out-dir", default=None, help="also save every image as its own PNG here")
    a = p.parse_args(argv)
    import torch

    from .data import save_image_grid
    from .sample import generate_images

    dev = _device(a.device)
    from .evaluate import load_model_and_tokenizer

    model, ckpt, tok, tck = load_model_and_tokenizer(a.model, a.tokenizer, dev)
    classes = _parse_classes(a.classes, model.config.num_classes)
    labels = torch.tensor(classes, device=dev).repeat_interleave(a.per_class)
    g = torch.Generator(device=dev).manual_seed(a.seed)
    images, _ = generate_images(model, tok.decode, labels, _settings(a), batch_size=a.batch_size, generator=g,
                                progress=True)  # fmt: skip
    save_image_grid(images, a.out, nrow=a.per_class)
    if a.out_dir:
        od = Path(a.out_dir)
        for i, (img, c) in enumerate(zip(images, labels.tolist())):
            save_image_grid(
                img[None], od / f"class{c:04d}_{i % a.per_class:04d}.png", nrow=1, min_tile=1
            )
    log.info("wrote %s (%d classes x %d)", a.out, len(classes), a.per_class)
    return 0


# =========================================================================== evaluate


def _print_table(rows: list[dict]) -> None:
    cols = [
        "run",
        "memory",
        "memory_density",
        "fid",
        "is",
        "kid",
        "val_bits_per_token",
        "params_total",
    ]
    print(" | ".join(f"{c:>18s}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:18.4f}" if isinstance(v, float) else f"{v!s:>18s}")
        print(" | ".join(cells))


def cmd_evaluate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="movegen evaluate", description=VERBS["evaluate"])
    p.add_argument("--model", nargs="+", required=True, help="one or more DIR/model.ckpt")
    p.add_argument(
        "--features", required=True, help="'inception' or 'classifier:DIR/classifier.ckpt'"
    )
    p.add_argument("--inception-weights", default=None, help=f"path of {INCEPTION_FILE}")
    p.add_argument(
        "--num-samples", type=int, default=10_000, help="images per model, balanced over classes"
    )
    p.add_argument("--tokenizer", default=None)
    p.add_argument(
        "--ref-split",
        default="train",
        choices=["train", "val", "test"],
        help="real images to compare with",
    )
    p.add_argument("--data-root", default=None)
    p.add_argument(
        "--val-codes", default=None, help="recompute bits/token on this held-out code store"
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="reference-statistics cache (default ~/.cache/movegen/ref)",
    )
    p.add_argument(
        "--export-npz",
        action="store_true",
        help="also write RESULTS/<run>.npz (ADM evaluator layout)",
    )
    _add_sampling_args(p)
    p.add_argument("--out", required=True, help="results folder: one <run-name>.json per model")
    a = p.parse_args(argv)
    from .data import atomic_write_text
    from .evaluate import evaluate_model

    dev = _device(a.device)
    out = Path(a.out)
    rows = []
    names = [Path(m).resolve().parent.name for m in a.model]
    if len(set(names)) != len(names):
        raise ValueError(f"two models share a run name (their folder names: {names}); results are written as "
                         "<run>.json, so evaluate them in separate calls with different --out folders")  # fmt: skip
    for m in a.model:
        run = Path(m).resolve().parent.name
        r = evaluate_model(m, features=a.features, num_samples=a.num_samples, settings=_settings(a), seed=a.seed,
                           device=dev, batch_size=a.batch_size, tokenizer=a.tokenizer, ref_split=a.ref_split,
                           cache_dir=a.cache_dir, inception_weights=a.inception_weights, data_root=a.data_root,
                           val_codes=a.val_codes, export_npz=out / f"{run}.npz" if a.export_npz else None)  # fmt: skip
        atomic_write_text(out / f"{run}.json", json.dumps(r, indent=2))
        rows.append(r)
    _print_table(rows)
    return 0


# =========================================================================== report


def cmd_report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="movegen report", description=VERBS["report"])
    p.add_argument("results", help="folder of <run>.json files from `movegen evaluate`")
    p.add_argument("--out", required=True, help="report folder (README.md and PNG plots)")
    a = p.parse_args(argv)
    from .report import write_report

    path = write_report(a.results, a.out)
    log.info("wrote %s", path)
    return 0


# =========================================================================== demo


def _repo_file(rel: str) -> Path:
    p = Path(__file__).resolve().parents[1] / rel
    if not p.exists():
        raise FileNotFoundError(
            f"{rel} not found next to the package; run the demo from a clone of the repository"
        )
    return p


def cmd_demo(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="movegen demo", description=VERBS["demo"])
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--tokenizer-steps", type=int, default=400)
    p.add_argument("--model-steps", type=int, default=400)
    p.add_argument("--classifier-epochs", type=int, default=30)
    p.add_argument("--num-samples", type=int, default=1000, help="images per model for FID/IS/KID")
    p.add_argument(
        "--cfg-scale", type=float, default=2.0, help="guidance for the evaluation samples"
    )
    p.add_argument("--grid-cfg-scale", type=float, default=3.0, help="guidance for the grid")
    p.add_argument("--grid-temperature", type=float, default=0.8, help="temperature for the grid")
    p.add_argument("--grid-top-k", type=int, default=10, help="top-k for the grid")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = Path(a.out)
    t0 = time.time()
    quiet = ["--trainer.enable_progress_bar", "false"]

    def run(step: str, args: list[str]) -> None:
        log.info("demo: %s", step)
        rc = COMMANDS[args[0]](args[1:])
        if rc:
            raise SystemExit(rc)

    tok, seed = out / "tokenizer", str(a.seed)
    run("1/6 tokenizer", ["fit-tokenizer", "--config", str(_repo_file("tokenizers/digits/config.yaml")),
                          "--out", str(tok), "--trainer.max_steps", str(a.tokenizer_steps), "--seed_everything", seed,
                          *quiet])  # fmt: skip
    for split in ("train", "val"):
        run(f"2/6 codes ({split})", ["extract-codes", "--tokenizer", str(tok / "tokenizer.ckpt"), "--split", split,
                                     "--out", str(out / f"codes-{split}"), "--overwrite", "--device", "cpu"])  # fmt: skip
    arms = ["standard", "move-x1"]
    for arm in arms:
        run(f"3/6 model {arm}", ["fit", "--config", str(_repo_file(f"configs/digits/{arm}.yaml")),
                                 "--codes", str(out / "codes-train"), "--val-codes", str(out / "codes-val"),
                                 "--out", str(out / arm), "--trainer.max_steps", str(a.model_steps),
                                 "--seed_everything", seed, *quiet])  # fmt: skip
    run("4/6 classifier", ["fit-classifier", "--data", "digits", "--out", str(out / "classifier"),
                           "--trainer.max_epochs", str(a.classifier_epochs), "--data.batch_size", "64",
                           "--seed_everything", seed])  # fmt: skip
    run("5/6 evaluation", ["evaluate", "--model", *[str(out / arm / "model.ckpt") for arm in arms],
                           "--features", f"classifier:{out / 'classifier' / 'classifier.ckpt'}",
                           "--num-samples", str(a.num_samples), "--cfg-scale", str(a.cfg_scale), "--seed", seed,
                           "--cache-dir", str(out / "cache"), "--out", str(out / "results"), "--device", "cpu"])  # fmt: skip
    run("6/6 grid", ["sample", "--model", str(out / "move-x1" / "model.ckpt"), "--classes", "all", "--per-class", "10",
                     "--cfg-scale", str(a.grid_cfg_scale), "--temperature", str(a.grid_temperature),
                     "--top-k", str(a.grid_top_k), "--seed", seed, "--out", str(out / "grid.png"),
                     "--device", "cpu"])  # fmt: skip
    run("6/6 report", ["report", str(out / "results"), "--out", str(out / "report")])
    tokm = json.loads((tok / "metrics.json").read_text())
    clsm = json.loads((out / "classifier" / "metrics.json").read_text())
    print(f"\nmovegen demo finished in {time.time() - t0:.0f} s -> {out}/")
    print(
        f"  tokenizer: val PSNR {tokm['psnr']:.2f} dB, codebook usage {100 * tokm['codebook_usage']:.0f}%"
    )
    print(f"  classifier (FID/IS/KID features): test accuracy {100 * clsm['test_accuracy']:.1f}%")
    for arm in arms:
        r = json.loads((out / "results" / f"{arm}.json").read_text())
        print(
            f"  {arm:9s} val {r['val_bits_per_token']:.3f} bits/token  FID {r['fid']:.2f}  IS {r['is']:.2f}  "
            f"KID {r['kid']:.4f}  ({r['params_total'] / 1e6:.2f} M params)"
        )
    print(
        f"  FID/IS/KID: {a.num_samples} samples per model, CFG {a.cfg_scale}, temperature 1, classifier features"
    )
    print(f"  grid of MoVE samples (one row per class; CFG {a.grid_cfg_scale}, temperature "
          f"{a.grid_temperature}, top-k {a.grid_top_k}): {out / 'grid.png'}")  # fmt: skip
    print(f"  report: {out / 'report' / 'README.md'}")
    return 0


# =========================================================================== main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="movegen",
        description="Class-conditional image generation over VQ tokens with MoVE (Mixture of Value Embeddings).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands:\n"
        + "\n".join(f"  {k:15s} {v}" for k, v in VERBS.items() if k in COMMANDS)
        + "\n\n`movegen <subcommand> --help` explains each.",
    )
    p.add_argument("--log-level", default="INFO")
    p.add_argument("subcommand", choices=sorted(COMMANDS), metavar="subcommand")
    if not argv or argv[0] in ("-h", "--help"):
        p.print_help()
        return 0
    level = "INFO"
    if argv[0] == "--log-level" and len(argv) > 1:
        level, argv = argv[1], argv[2:]
    a, rest = p.parse_known_args(argv[:1])
    _setup_logging(level)
    try:
        return COMMANDS[a.subcommand](argv[1:]) or 0
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        log.error("%s", e)
        return 2


COMMANDS = {
    "fit-tokenizer": cmd_fit_tokenizer,
    "extract-codes": cmd_extract_codes,
    "fit": cmd_fit,
    "info": cmd_info,
    "sample": cmd_sample,
    "fit-classifier": cmd_fit_classifier,
    "evaluate": cmd_evaluate,
    "report": cmd_report,
    "demo": cmd_demo,
}

if __name__ == "__main__":
    sys.exit(main())
