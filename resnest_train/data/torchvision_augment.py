"""The training augmentation the torchvision backend applies, with the framework's draws for one image
(draws.py): AutoAugment or RandAugment (on the image or on the crop), the crop window at the epoch's size,
flip, colour jitter, PCA lighting, normalisation, in the order DALI's graph applies them (dali_train.py)."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from resnest_train.data.autoaugment import POLICIES, apply_sub_policy, resolve
from resnest_train.data.crops import INTERPOLATIONS
from resnest_train.data.plan import DataPlan
from resnest_train.data.randaugment import apply_rand_augment, is_rand_augment, parse_rand_augment
from resnest_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD, lighting_shift


class TrainAugment:
    """The training augmentation with the framework's draws for one image (draws.py): AutoAugment or
    RandAugment (on the image or on the crop), the random-resized crop's window, flip, colour jitter
    (brightness, contrast, saturation, in that order, as the DALI graph applies them), PCA lighting,
    normalisation."""

    def __init__(self, plan: DataPlan):
        self.plan = plan
        self.sub_policies = resolve(POLICIES[plan.autoaugment]) if plan.autoaugment in POLICIES else []
        self.rand_augment = parse_rand_augment(plan.autoaugment) if is_rand_augment(plan.autoaugment) else None
        self.interpolation = T.InterpolationMode(plan.interpolation)

    def augment(self, image: Image.Image, draws: dict) -> Image.Image:
        if self.rand_augment is not None:
            return apply_rand_augment(image, self.rand_augment, draws["op"], draws["run"], draws["arg"])
        if self.sub_policies:
            return apply_sub_policy(image, self.sub_policies[draws["sub_policy"]], draws["run"], draws["negate"])
        return image

    def __call__(self, image: Image.Image, draws: dict, size: int | None = None) -> torch.Tensor:
        """`size`: the epoch's crop (`DataPlan.train_size`); None: `crop_size`."""
        plan = self.plan
        size = size or plan.crop_size
        if plan.autoaugment_on == "image":
            image = self.augment(image, draws)
        top, left, height, width = draws["crop"]
        # data.crop=inception draws each image's interpolation (crops.py); the others use data.interpolation
        interpolation = T.InterpolationMode(INTERPOLATIONS[draws["interp"]]) if "interp" in draws \
            else self.interpolation
        image = F.resized_crop(image, top, left, height, width, [size, size],
                               interpolation=interpolation, antialias=True)
        if plan.autoaugment_on == "crop":
            image = self.augment(image, draws)
        if draws["flip"]:
            image = F.hflip(image)
        if plan.color_jitter > 0:
            brightness, contrast, saturation = draws["jitter"]
            image = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(image, brightness), contrast), saturation)
        tensor = F.to_tensor(image)
        if plan.lighting > 0:
            tensor = tensor + lighting_shift(draws["lighting"])[:, None, None]
        return F.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)
