"""RandAugment (`randaugment.py`: timm's table, arguments and signs) in a DALI graph, applying the framework's
draws: for each layer, the image's op index (into timm's table), its uniform (the layer runs when it is below
p) and the op's argument, computed once by `randaugment.op_args` (draws.py) and the same float32 the PIL side
applies. The ops are `dali_autoaugment`'s (each written to give the PIL op's image); what is done here is
turning the per-sample argument into the parameter each op takes, on the device it reads it on: the warps'
parameters are CPU argument inputs, the point ops' are tensors beside the images (DALI's own `param_device`
rule, `nvidia.dali.auto_aug.core._augmentation`). DALI's own `rand_augment` draws its ops, magnitude bins and
signs itself (`fn.random`) and has no magnitude noise, so it is not used.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.auto_aug.core._select import select

from resnest_train.data.autoaugment import posterize_mask
from resnest_train.data.dali_autoaugment import dali_op
from resnest_train.data.randaugment import RandAugmentSpec

# Bits kept 0..8 (randaugment clamps them there) -> posterize's AND mask, looked up per sample.
_MASKS = np.array([posterize_mask(bits) for bits in range(9)], np.uint8)


def _beside(images, parameter):
    """A per-sample parameter on the images' device (the point ops compute with it there)."""
    return parameter.gpu() if images.device == "gpu" else parameter


def _axis(arg, axis: int):
    """(x, 0) or (0, x): a shear or translation vector from the per-sample scalar (a CPU argument input)."""
    return arg * types.Constant(np.eye(2, dtype=np.float32)[axis])


def _as(arg, dtype):
    return fn.cast(arg, dtype=dtype)  # integral float32 values: exact


# op -> the op's parameter from the layer's argument (a per-sample float32 scalar on the CPU)
_PARAMETERS = {
    "shear_x": lambda images, arg: _axis(arg, 0),
    "shear_y": lambda images, arg: _axis(arg, 1),
    "translate_x": lambda images, arg: _axis(arg, 0),
    "translate_y": lambda images, arg: _axis(arg, 1),
    "rotate": lambda images, arg: arg,
    "solarize": lambda images, arg: _beside(images, _as(arg, types.INT32)),
    "solarize_add": lambda images, arg: _beside(images, _as(arg, types.UINT8)),
    "posterize": lambda images, arg: types.Constant(_MASKS, device=images.device)[_as(arg, types.INT32)],
    "color": lambda images, arg: _beside(images, arg),
    "contrast": lambda images, arg: _beside(images, arg),
    "brightness": lambda images, arg: _beside(images, arg),
    "sharpness": lambda images, arg: _beside(images, arg),
    "auto_contrast": lambda images, arg: None,
    "equalize": lambda images, arg: None,
    "invert": lambda images, arg: None,
}


def _layer_op(op: str):
    function, parameter = dali_op(op), _PARAMETERS[op]
    return lambda images, arg: function(images, parameter(images, arg))


def dali_rand_augment(images, op, run, arg, *, spec: RandAugmentSpec):
    """RandAugment on a batch of HWC uint8 images inside a pipeline built with `enable_conditionals=True`:
    layer k applies table entry op[k] with argument arg[k] to the images whose run[k] is below p (each
    sample's (layers,) draws from draws.py). The translation's pixels were computed for the image size
    RandAugment sees (draws.py), so full images and crops take the same call."""
    table = [_layer_op(name) for name in spec.ops]
    for layer in range(spec.num_layers):
        if run[layer] < spec.prob:
            images = select(table, op[layer], images, arg[layer])
    return images
