"""Constants and the one transform torchvision lacks (PCA lighting), shared by both pipelines."""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ImageNet RGB covariance eigen-decomposition (AlexNet, Krizhevsky et al. 2012), as in the Gluon recipe.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))


class Lighting:
    """Add eigvec @ (alpha * eigval), alpha ~ N(0, std), to a (3, H, W) float image in [0, 1]."""

    def __init__(self, std: float):
        self.std = std
        self.eigval = torch.tensor(PCA_EIGVAL)
        self.eigvec = torch.tensor(PCA_EIGVEC)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.std
        shift = self.eigvec @ (alpha * self.eigval)
        return image + shift[:, None, None]
