#!/usr/bin/env python
"""Train a ResNeSt model: `python train.py --config configs/resnest50.yaml [--print-config] [KEY=VALUE ...]`,
or under `torchrun` for DDP across GPUs and nodes (README)."""

import sys

from resnest_train.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
