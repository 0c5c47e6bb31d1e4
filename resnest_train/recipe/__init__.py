"""The training recipe's maths, free of files and processes' bookkeeping: the global batch and the lr and
DropBlock schedules (`schedule.py`), parameter groups and the optimizer (`optim.py`), the loss and mixup
(`loss.py`), the weight EMA and BN statistics across ranks (`averaging.py`), every random draw's seed
(`randomness.py`), and one micro-step, optimizer step and validation pass (`engine.py`). Imports `config`,
`errors` and `cluster`."""
