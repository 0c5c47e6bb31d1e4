"""Constants and the one operation torchvision lacks (PCA lighting's shift), shared by both pipelines."""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ImageNet RGB covariance eigen-decomposition (AlexNet, Krizhevsky et al. 2012), as in the Gluon recipe.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))


def lighting_shift(alpha) -> torch.Tensor:
    """AlexNet PCA lighting's RGB shift for an image in [0, 1]: eigvec @ (alpha * eigval), with `alpha` (3
    per image) drawn by the framework (draws.py)."""
    return torch.tensor(PCA_EIGVEC) @ (torch.tensor(alpha, dtype=torch.float32) * torch.tensor(PCA_EIGVAL))
