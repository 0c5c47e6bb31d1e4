"""DALI autograph's generated files (`resnest_train/data/autograph_files.py`): none left in the temp folder,
even by a process killed before its `atexit` handlers run, and tracebacks still show their source."""

from __future__ import annotations

import linecache
import os
import sys

import pytest

from tests.conftest import ROOT, run_script, script_env

pytestmark = pytest.mark.dali

PREFIX = "__autograph_generated_file"

# Two builds of a conditional pipeline, then a SIGKILL (what the OOM killer or SLURM's final kill sends):
# no atexit handler runs, so DALI's own cleanup does not either.
SCRIPT = """
import os, signal, tempfile
{setup}
from nvidia.dali import fn, pipeline_def

@pipeline_def(batch_size=2, num_threads=1, device_id=None, enable_conditionals=True, seed=1)
def conditional():
    x = fn.random.uniform(range=[0, 1], shape=[2])
    if fn.random.coin_flip() == 1:
        x = x + 1
    return x

for _ in range(2):
    pipe = conditional()
    pipe.build()
    pipe.run()
print(sum(name.startswith("{prefix}") for name in os.listdir(tempfile.gettempdir())), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _run_killed(tmp_path, setup: str) -> tuple[int, list[str]]:
    """Files present while the process ran, and the names left after it was killed."""
    script, temp = tmp_path / "conditional.py", tmp_path / "tmp"  # a file: autograph reads the source back
    script.write_text(SCRIPT.format(setup=setup, prefix=PREFIX))
    temp.mkdir()
    result = run_script([str(script)], expect=-9, env=script_env(TMPDIR=str(temp), PYTHONPATH=str(ROOT)),
                        timeout=120)
    return int(result.stdout.split()[-1]), sorted(p.name for p in temp.iterdir() if p.name.startswith(PREFIX))


def test_a_killed_process_leaves_no_autograph_files(tmp_path):
    # Importing the DALI data module is the whole integration of the training code.
    assert _run_killed(tmp_path, "import resnest_train.data.dali") == (0, [])


def test_without_it_a_killed_process_leaves_its_autograph_files(tmp_path):
    """The leak the module exists for (DALI 2.4), so the test above can see it."""
    during, left = _run_killed(tmp_path, "")
    assert during >= 1 and len(left) == during


def test_generated_source_stays_readable_for_tracebacks(tmp_path):
    from nvidia.dali import fn, pipeline_def

    from resnest_train.data.autograph_files import delete_autograph_files_after_loading

    assert delete_autograph_files_after_loading() and delete_autograph_files_after_loading()  # idempotent

    @pipeline_def(batch_size=2, num_threads=1, device_id=None, enable_conditionals=True, seed=1)
    def readable():
        x = fn.random.uniform(range=[0, 1], shape=[2])
        if fn.random.coin_flip() == 1:
            x = x * 3
        return x

    before = {name for name in sys.modules if name.startswith(PREFIX)}
    readable().build()
    generated = [module for name, module in sys.modules.items() if name.startswith(PREFIX) and name not in before]
    assert generated
    for module in generated:
        assert not os.path.exists(module.__file__)
        assert any("autograph__readable" in line for line in linecache.getlines(module.__file__))
