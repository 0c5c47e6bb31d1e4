"""Processes and their agreement: the process group and object collectives (`distributed.py`), "rank 0 acts
and every rank learns the outcome" and the one exit path of a failure (`agreement.py`), and per-process
setup: seeds, CPU kernel settings, stop signals, the launcher's death (`process.py`). Imports only `errors`
from the rest of the package."""
