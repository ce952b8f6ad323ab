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


def _lightning_cli(model_cls, dm_cls, argv: list[str], prog: str, extra_args):
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
        trainer_defaults={"logger": False, "enable_checkpointing": False, "enable_model_summary": False},
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
        parser.add_argument("--out", required=True, help="output folder (tokenizer.ckpt, metrics.json, reconstructions.png)")

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
    trainer = cli.trainer
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
    ds_info = {"name": dm.name, "fit": dm.fit, "image_size": dm.image_size, "num_classes": dm.train_set.info.num_classes}
    atomic_torch_save(tokenizer_checkpoint(tok, dataset=ds_info, metrics=metrics), out / "tokenizer.ckpt")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    x = torch.stack([dm.val_set[i][0] for i in range(min(16, len(dm.val_set)))])
    with torch.no_grad():
        recon = tok.decode(tok.encode(x))
    save_image_grid(torch.cat([x, recon]), out / "reconstructions.png", nrow=len(x))
    log.info("wrote %s (val psnr %.2f dB) in %.0f s", out / "tokenizer.ckpt", metrics["psnr"], seconds)
    return 0


# =========================================================================== extract-codes


def cmd_extract_codes(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="movegen extract-codes", description=VERBS["extract-codes"])
    p.add_argument("--tokenizer", required=True, help="DIR/tokenizer.ckpt from fit-tokenizer")
    p.add_argument("--data", default=None, help="dataset name (default: the tokenizer's)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--views", type=int, default=2, help="2: original + horizontal flip; 1: original only")
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
    from .lit import BestCheckpoint, CodeDataModule, LitGPT, cost_report

    def extra(parser):
        parser.add_argument("--out", required=True, help="output folder (model.ckpt at best validation, metrics.json)")

    argv = _rename_flags(argv, {"--codes": "--data.codes", "--val-codes": "--data.val_codes"})
    torch.set_float32_matmul_precision("high")
    cli = _lightning_cli(LitGPT, CodeDataModule, argv, "movegen fit", extra)
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
        raise ValueError("training ran no validation; lower --trainer.val_check_interval or raise max_steps")
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
    print(f"  {'forward FLOPs per token':30s} {rep['flops_per_token']:>14,d}  ({rep['flops_per_token'] / 1e6:.1f} MFLOP)")
    print(f"  {'bank bytes read per token':30s} {rep['bank_bytes_per_token']:>14,d}  (bf16, all layers)")
    return 0


# =========================================================================== main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="movegen",
        description="Class-conditional image generation over VQ tokens with MoVE (Mixture of Value Embeddings).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands:\n" + "\n".join(f"  {k:15s} {v}" for k, v in VERBS.items() if k in COMMANDS)
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
}

if __name__ == "__main__":
    sys.exit(main())
