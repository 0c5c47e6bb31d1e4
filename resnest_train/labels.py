"""The labels an evaluation scores against: the model's class list (a checkpoint's names, `--classes FILE`,
ImageNet-V2's class-index folders) and ImageNet-ReaL's reassessed labels (`--real-labels FILE`).

ReaL (Beyer et al. 2020, "Are we done with ImageNet?"; timm's `validate.py --real-labels`): a JSON list with
one list of acceptable class indices per validation image, indexed by the sorted file names of the
ImageNet validation set (`ILSVRC2012_val_00000001.JPEG` first). A prediction is correct when it is one of
its image's labels; images whose list is empty (no label survived the reassessment) are not counted.
ImageNet-V2 (and any such folder) names its class folders by class index, `0` to `999`, which sorted as
strings would label `10` as class 2: `--class-index-folders` labels each folder by its number.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import torch

from resnest_train.errors import UserError


def read_class_list(path: str, num_classes: int) -> list[str]:
    """`--classes FILE`: the model's class names in label order, one per line (a `classes.txt`)."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--classes {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(names) != num_classes or len(set(names)) != len(names):
        raise UserError(f"--classes {path} names {len(names)} classes ({len(set(names))} distinct); the model has "
                        f"{num_classes}: one name per line, in label order")
    return names


def class_index_names(num_classes: int) -> list[str]:
    """`--class-index-folders`: folder `i` is class i."""
    return [str(i) for i in range(num_classes)]


def check_val_folders(index, root: str, num_classes: int, checkpoint: str) -> None:
    """Weights that do not name their classes, on a val/ folder alone: its folders are labelled in sorted
    order, so with a class missing every later folder would take its neighbour's label (top-1 33% for 92%,
    silently). Refused unless the folders are the whole class list."""
    if index is None or index.layout != "folder" or len(index.classes) >= num_classes:
        return
    raise UserError(f"{Path(root) / 'val'} has {len(index.classes)} class folders but the model has {num_classes} "
                    f"classes and {checkpoint} does not name them: the labels of the folders after a missing class "
                    "would shift; give the class names in label order with --classes FILE (one per line), or "
                    "evaluate a folder with every class")


def _file_name(path: str) -> str:
    """An image's file name: of `class/name.JPEG`, and of a shard member `shard.tar:name.JPEG` (a member
    name may hold ':' itself)."""
    return PurePosixPath(path.partition(".tar:")[2] or path).name


class RealLabels:
    """ImageNet-ReaL labels of a validation list, looked up by each image's file name."""

    def __init__(self, path: str, val, num_classes: int) -> None:
        try:
            labels = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"--real-labels {path}: {getattr(exc, 'strerror', None) or exc}") from None
        if not isinstance(labels, list):
            raise UserError(f"--real-labels {path}: expected a JSON list of label lists (ImageNet-ReaL's real.json)")
        names = sorted(_file_name(val.path(i)) for i in range(len(val)))
        if len(labels) != len(names) or len(set(names)) != len(names):
            raise UserError(f"--real-labels {path} labels {len(labels)} images; the validation list has "
                            f"{len(names)} ({len(set(names))} distinct file names): ReaL labels the full ImageNet "
                            "validation set")
        _check_entries(path, labels, names, num_classes)
        self.labels = {name: set(row) for name, row in zip(names, labels)}

    def counts(self, paths: list[str], top5: list[list[int]], device: torch.device) -> torch.Tensor:
        """(correct at 1, correct at 5, images with labels) of these predictions, to be summed over ranks."""
        counts = torch.zeros(3, dtype=torch.float64)
        for path, predicted in zip(paths, top5):
            real = self.labels[_file_name(path)]
            if real:
                counts += torch.tensor([predicted[0] in real, any(p in real for p in predicted), 1.0])
        return counts.to(device)


def _check_entries(path: str, labels: list, names: list[str], num_classes: int) -> None:
    """Every entry a list of class indices of the model, some not empty: a file of strings, of another
    label space or of empty lists otherwise scores ReaL-1 0.00 (no prediction is ever one of its labels),
    with no word. Entries are numbered from 1, as the images they label (`ILSVRC2012_val_00000001.JPEG`)."""
    for number, (row, name) in enumerate(zip(labels, names), start=1):
        # bool is an int in Python, and JSON's true would pass as class 1
        if not isinstance(row, list) or not all(type(label) is int and 0 <= label < num_classes for label in row):
            text = json.dumps(row)
            raise UserError(f"--real-labels {path}: entry {number} ({text if len(text) <= 60 else text[:57] + '...'}"
                            f", image {name}) is not a list of class indices in 0..{num_classes - 1}")
    if not any(labels):
        raise UserError(f"--real-labels {path}: every entry is an empty list, so no image has a ReaL label to "
                        "score against")
