"""movegen: class-conditional image generation over VQ tokens with MoVE (Mixture of Value Embeddings)."""

from .checkpoint import load_model, load_model_and_tokenizer, load_tokenizer
from .model import GPT, GPTConfig
from .sample import CompiledStep, SamplingSettings, generate
from .tokenizer import TokenizerConfig, VQTokenizer

__all__ = [
    "CompiledStep",
    "GPT",
    "GPTConfig",
    "SamplingSettings",
    "TokenizerConfig",
    "VQTokenizer",
    "generate",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
]
__version__ = "0.1.0"
