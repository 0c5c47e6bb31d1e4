"""ResNeSt models (arXiv 2004.08955): the public API `create_model`, `list_models`, `load_pretrained`."""

from resnest_train.models.dropblock import DropBlock2d
from resnest_train.models.pretrained import load_pretrained
from resnest_train.models.resnest import ResNeSt, ResNeStBottleneck
from resnest_train.models.split_attention import RadixSoftmax, SplitAttentionConv2d
from resnest_train.models.zoo import create_model, list_models

__all__ = ["create_model", "list_models", "load_pretrained", "DropBlock2d", "ResNeSt", "ResNeStBottleneck",
           "RadixSoftmax", "SplitAttentionConv2d"]
