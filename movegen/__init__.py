from .tokenizer import TokenizerConfig, VQTokenizer

__all__ = ["TokenizerConfig", "VQTokenizer"]
