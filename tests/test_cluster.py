"""Clusters on one machine: two torchrun "nodes" on loopback, each in its own working folder with its own
data copy and a relative output_dir (nodes that share no disk). Only rank 0 reads and writes the run
folder; the other rank gets the resume state, the dataset index and the decisions from it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from tests.conftest import DEMO, ROOT, TINY, TORCHRUN, free_port, script_env, skip_unless_dali

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def node_cmd(node_rank: int, port: int, *extra: str) -> list[str]:
    """Static rendezvous: node rank 0 holds global rank 0 (FACTS.md)."""
    cmd = [*TORCHRUN, "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node_rank}", "--master-addr=127.0.0.1",
           f"--master-port={port}", str(ROOT / "train.py"), "--config", DEMO, "data.root=data", "output_dir=run",
           *TINY, "train.epochs=2", "train.deterministic=true", "schedule.warmup_epochs=0.5", *extra]
    skip_unless_dali(cmd)
    return cmd


def start_nodes(folders, *extra: str) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen(node_cmd(rank, port, *extra), cwd=folder, env=script_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
            for rank, folder in enumerate(folders)]


def finish(nodes) -> list[str]:
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n=====\n".join(outputs)[-5000:]
    return outputs


def kill_hard(nodes) -> None:
    """kill -9 of every process of both nodes: torchrun and its workers (which run in sessions of their own)."""
    for node in nodes:
        workers = subprocess.run(["pgrep", "-P", str(node.pid)], capture_output=True, text=True).stdout.split()
        for pid in [*map(int, workers), node.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.wait()


def weights(folder) -> dict:
    return torch.load(folder / "run" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]


def test_nodes_without_a_shared_disk_resume_from_one_state(image_root, tmp_path):
    shared = tmp_path / "shared"
    shutil.copytree(image_root, shared / "data")
    finish(start_nodes([shared, shared]))
    reference = weights(shared)

    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        shutil.copytree(image_root, folder / "data")
    nodes = start_nodes(folders, "checkpoint.interval_steps=2")
    deadline = time.time() + 300
    while not (folders[0] / "run" / "checkpoints" / "step-000000002.pt").exists():
        assert all(node.poll() is None for node in nodes) and time.time() < deadline, "no mid-epoch checkpoint"
        time.sleep(0.05)
    kill_hard(nodes)
    state = torch.load(folders[0] / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < state["batch"] < 3 and state["epoch"] == 0  # mid-epoch
    assert not (folders[1] / "run" / "checkpoints").exists()  # rank 1 never needs (or writes) a checkpoint
    outputs = finish(start_nodes(folders, "checkpoint.interval_steps=2"))
    assert "resuming from" in outputs[0]
    final = weights(folders[0])
    assert [k for k in reference if not torch.equal(reference[k], final[k])] == []
