"""The small CNN classifier whose features score generated images (FID/KID) and logits (IS).

A model file, like ``tokenizer.py`` and ``model.py``: it imports torch only. Trained by
``LitClassifier`` (``lit.py``), saved and loaded by ``checkpoint.py``, wrapped as a feature
extractor in ``metrics.py``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallCNN(nn.Module):
    """A small CNN classifier: three conv stages, global average pool, a ``feature_dim`` layer
    (the FID/KID features) and the class logits (the IS features). Images in [-1, 1]."""

    def __init__(self, num_classes: int = 10, channels: int = 1, image_size: int = 28, width: int = 32,
                 feature_dim: int = 128, dropout: float = 0.3):  # fmt: skip
        super().__init__()
        self.num_classes, self.channels, self.image_size = num_classes, channels, image_size
        self.width, self.feature_dim, self.dropout_p = width, feature_dim, dropout

        def stage(cin, cout, pool):
            layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                      nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]  # fmt: skip
            return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))

        pools = [image_size >= 16, image_size >= 8, False]
        self.body = nn.Sequential(stage(channels, width, pools[0]), stage(width, 2 * width, pools[1]),
                                  stage(2 * width, 4 * width, pools[2]))  # fmt: skip
        self.fc = nn.Linear(4 * width, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(feature_dim, num_classes)

    def hparams(self) -> dict:
        return {"num_classes": self.num_classes, "channels": self.channels, "image_size": self.image_size,
                "width": self.width, "feature_dim": self.feature_dim, "dropout": self.dropout_p}  # fmt: skip

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, S, S) -> (B, feature_dim)`` (after ReLU)."""
        return F.relu(self.fc(self.body(x).mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.features(x)))


__all__ = ["SmallCNN"]
