"""Checkpoints: the format (what a checkpoint holds and how its keys are named), the files (atomic saves,
links, the run folder's lock, finding the state to resume: `files.py`), rank 0's background writer
(`writer.py`) and what a run trains on (`provenance.py`). Imports `config`, `errors` and `cluster`."""
