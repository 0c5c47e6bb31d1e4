"""A training run: the loop (`runner.py`), resume decisions and their application (`resume.py`), rank 0's
work on the run folder (`run_folder.py`), checkpoints during the run (`saving.py`), the model as runs use
it (`wrapping.py`) and reporting (`reporting.py`). The top of the package: it may import every subpackage,
and only `evaluation.py` and `cli.py` import it."""
