"""movegen: class-conditional image generation over VQ tokens with MoVE (Mixture of Value Embeddings)."""

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
]
__version__ = "0.1.0"
