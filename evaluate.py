#!/usr/bin/env python
"""Evaluate a checkpoint at one or more crop sizes:
`python evaluate.py --config FILE --checkpoint PATH [--crop-size N ...] [--output results.json] [KEY=VALUE ...]`,
single process or under `torchrun`; every validation image is counted exactly once."""

import sys

from resnest_train.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
