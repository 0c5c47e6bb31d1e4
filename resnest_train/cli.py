"""The command-line front doors of train.py and evaluate.py: parse, load the config, run, and turn every
user error into one `error: ...` line with exit code 2 (no traceback)."""

from __future__ import annotations

import argparse
import sys

from resnest_train.config import MAX_IMAGE_SIZE
from resnest_train.config_yaml import load_config, to_yaml
from resnest_train.errors import UserError


def _report(main, argv) -> int:
    try:
        return main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _train(argv) -> int:
    parser = argparse.ArgumentParser(prog="train.py", description="Train a ResNeSt model from a YAML config.")
    parser.add_argument("--config", required=True, help="YAML experiment config (configs/*.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override a config key (YAML value)")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(config), end="")
        return 0
    from resnest_train.run.runner import train
    folder = train(config)
    print(f"run folder: {folder}")
    return 0


def train_main(argv: list[str] | None = None) -> int:
    return _report(_train, argv)


def _evaluate(argv) -> int:
    parser = argparse.ArgumentParser(prog="evaluate.py", description="Evaluate a checkpoint at one or more crops.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True, help="our checkpoint, an official ResNeSt .pth, or timm weights")
    parser.add_argument("--crop-size", type=int, nargs="+", help="default: data.val_crop_size")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--predictions", help="write per-image top-5 predictions as CSV here")
    parser.add_argument("--batch-size", type=int, help="default: train.batch_size")
    parser.add_argument("--weights", choices=("model", "ema"), default="model",
                        help="our checkpoints: the model's weights or their EMA (train.ema)")
    parser.add_argument("--real-labels", metavar="FILE", help="ImageNet-ReaL's real.json: ReaL top-1/top-5 "
                        "beside the original labels' (indexed by the sorted validation file names, as in timm)")
    parser.add_argument("--class-index-folders", action="store_true", help="val folders are named by class "
                        "index, 0 to N-1 (ImageNet-V2): folder i is class i")
    parser.add_argument("--classes", metavar="FILE", help="the model's class names in label order, one per line "
                        "(for weights that do not name them, on a val/ folder without every class)")
    parser.add_argument("--flip", action="store_true", help="test-time horizontal flip: score each image by the "
                        "mean of its softmax and its mirror's (each image still counted once)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    # KEY=VALUE words are taken out first, in order: `--crop-size 224 256 data.root=X` would otherwise
    # hand the override to the greedy crop-size list.
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args([a for a in argv if a not in overrides])
    if args.crop_size and not all(8 <= crop <= MAX_IMAGE_SIZE for crop in args.crop_size):
        raise UserError(f"--crop-size takes sizes from 8 to {MAX_IMAGE_SIZE}, got {args.crop_size}")
    if args.batch_size is not None and not 1 <= args.batch_size <= 65_536:
        raise UserError(f"--batch-size must be from 1 to 65536, got {args.batch_size}")
    config = load_config(args.config, overrides)
    from resnest_train.evaluation import EvalOptions, evaluate_checkpoint
    evaluate_checkpoint(config, args.checkpoint, EvalOptions(
        crop_sizes=args.crop_size, output=args.output, predictions=args.predictions, batch_size=args.batch_size,
        classes_file=args.classes, weights=args.weights, real_labels=args.real_labels,
        class_index_folders=args.class_index_folders, flip=args.flip))
    return 0


def evaluate_main(argv: list[str] | None = None) -> int:
    return _report(_evaluate, argv)
