"""Every YAML under configs/ and tokenizers/ parses (keys and types) and builds its model config."""

from pathlib import Path

import pytest

from movegen.cli import load_model_config
from movegen.data import CodeDataModule, ImageDataModule
from movegen.lit import LitGPT, LitTokenizer
from movegen.model import cost_report

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_YAMLS = sorted((ROOT / "tokenizers").rglob("*.yaml"))
# configs/studies/ holds `movegen study` YAMLs, parsed by tests/test_study.py
MODEL_YAMLS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "studies")


def _parse(verb, path):
    """Parse a YAML with the training verb's own parser (its trainer defaults and links), build
    nothing."""
    from movegen.cli import _train_cli_class

    class ParseOnly(_train_cli_class()):
        def instantiate_classes(self):  # parse and validate, build nothing
            pass

    classes = {"fit": (LitGPT, CodeDataModule), "fit-tokenizer": (LitTokenizer, ImageDataModule)}
    return ParseOnly(
        *classes[verb], verb=verb, args=["--config", str(path), "--out", "unused"]
    ).config


def test_yamls_exist():
    assert len(TOKENIZER_YAMLS) >= 2 and len(MODEL_YAMLS) >= 17


@pytest.mark.parametrize("path", TOKENIZER_YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_tokenizer_yaml_parses(path):
    cfg = _parse("fit-tokenizer", path)
    from movegen.tokenizer import TokenizerConfig

    TokenizerConfig(**{k: v for k, v in vars(cfg.model.config).items()})


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_model_yaml_parses(path):
    _parse("fit", path)
    rep = cost_report(load_model_config(path))
    assert rep["params_total"] > 0 and rep["flops_per_token"] > 0


def test_arms_differ_only_in_memory_fields():
    for folder in ("digits", "fashion-mnist"):
        texts = {}
        for p in sorted((ROOT / "configs" / folder).glob("*.yaml")):
            lines = [
                l
                for l in p.read_text().splitlines()[1:]
                if not l.strip().startswith(("memory:", "memory_density:"))
            ]
            texts[p.stem] = lines
        assert set(texts) >= {"standard", "lave-x1", "lave-x2", "move-x1", "move-x2", "move-x4"}
        assert len({tuple(v) for v in texts.values()}) == 1, folder


def test_no_python_in_tokenizers():
    assert not list((ROOT / "tokenizers").rglob("*.py"))
