"""The Python files DALI's autograph writes for pipelines built with `enable_conditionals=True`: deleted as
soon as DALI has loaded them, so a run leaves none in the temp folder, however it ends.

DALI 2.4 converts each conditional pipeline function to source code and imports it from a file it creates
with `tempfile.NamedTemporaryFile(prefix="__autograph_generated_file", suffix=".py", delete=False)`
(`nvidia/dali/_autograph/pyct/loader.py`, `load_source`), and deletes it only in an `atexit` handler
(FACTS.md). A process that ends without running `atexit` (SIGKILL from the OOM killer or from SLURM after
its grace period, torchrun's kill of a stuck worker, `os._exit`) leaves every file it wrote; our training
pipeline makes about ten per process.

Python needs the file only while importing it; afterwards only tracebacks and `inspect` read the source
back, and both go through `linecache`. So each file is deleted right after the import and its source put
into `linecache`, where they still find it. Only the file that this process's own call created is deleted,
never one matched by name, so concurrent processes sharing the temp folder are unaffected.
"""

from __future__ import annotations

import functools
import linecache
import logging
import os

log = logging.getLogger(__name__)


def _deleting_after_load(load_source):
    @functools.wraps(load_source)
    def load_and_delete(source, delete_on_exit):
        module, file_name = load_source(source, delete_on_exit)
        # mtime None: linecache.checkcache keeps the entry although the file is gone.
        linecache.cache[file_name] = (len(source), None, source.splitlines(keepends=True), file_name)
        try:
            os.remove(file_name)
        except FileNotFoundError:
            pass  # a temp-folder cleaner was faster; DALI's own atexit handler ignores this too
        return module, file_name

    load_and_delete.deletes_after_load = True
    return load_and_delete


def delete_autograph_files_after_loading() -> bool:
    """Make DALI's autograph delete each generated file once it is imported (idempotent). Returns False, with
    a warning, if this DALI version has no such loader: the files then stay until the process exits."""
    try:
        from nvidia.dali._autograph.pyct import loader
    except ImportError:
        loader = None
    load_source = getattr(loader, "load_source", None)
    if load_source is None:
        log.warning("DALI has no autograph loader.load_source: its generated files stay in the temp folder "
                    "until the process exits")
        return False
    if not getattr(load_source, "deletes_after_load", False):
        # `load_ast` looks `load_source` up in its module at each call, so replacing the attribute suffices.
        loader.load_source = _deleting_after_load(load_source)
    return True
