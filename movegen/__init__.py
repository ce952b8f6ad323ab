"""movegen: class-conditional image generation over VQ tokens with MoVE (Mixture of Value Embeddings)."""

from .model import GPT, GPTConfig
from .sample import generate
from .tokenizer import TokenizerConfig, VQTokenizer

__all__ = ["GPT", "GPTConfig", "TokenizerConfig", "VQTokenizer", "generate"]
__version__ = "0.1.0"
