"""Two "nodes" of one CPU process each on this machine, through Lightning's environment variables.

``MASTER_ADDR`` / ``MASTER_PORT`` / ``NODE_RANK`` / ``WORLD_SIZE`` are what a multi-node launch without a cluster
manager sets on every node (Lightning's ``LightningEnvironment``); each node runs ``python run.py`` with
``trainer.num_nodes=2`` in its own folder. Loopback only.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.config import ROOT
from tests.helpers.runs import TINY_RUN

IMAGES, BATCH, EPOCHS = 8, 2, 2  # 2 steps an epoch: 8 images over 2 nodes x 2 per batch
BASE_LR = 0.04


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_node(node: int, port: int, args: list[str], out_path: Path) -> subprocess.Popen:
    """``python run.py <args>`` as node ``node`` of a run of 2 nodes meeting at ``port`` here, its output in
    ``out_path``."""
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        NODE_RANK=str(node),
        WORLD_SIZE="2",
        GLOO_SOCKET_IFNAME="lo",
    )
    env.pop("LOCAL_RANK", None)
    with open(out_path, "w") as out:
        return subprocess.Popen(
            [sys.executable, "run.py", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def read_records(path):
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()]


# Slow (about 20 s: two run.py processes, the only multi-node run). The default suite checks its parts: DDP through
# run.py (tests/e2e/test_ddp.py's evaluation), the data's shards (tests/data/test_samplers.py) and the learning rate
# of the global batch over every process (tests/test_lit_module.py).
@pytest.mark.slow
def test_two_nodes_scale_the_lr_shard_the_data_and_keep_identical_weights(tmp_path):
    port = free_port()
    processes = []
    try:
        for node in range(2):
            args = [
                *TINY_RUN,
                "trainer=ddp_cpu",
                "trainer.devices=1",
                "trainer.num_nodes=2",
                f"trainer.max_epochs={EPOCHS}",
                f"trainer.check_val_every_n_epoch={EPOCHS}",
                f"data.num_train_images={IMAGES}",
                "data.num_val_images=2",
                f"data.datamodule.batch_size={BATCH}",
                f"base_lr={BASE_LR}",
                "+callbacks.record_batches._target_=tests.helpers.runs.RecordTrainBatches",
                f"+callbacks.record_batches.path={tmp_path / f'batches{node}.jsonl'}",
                "+callbacks.record_weights._target_=tests.helpers.runs.RecordWeights",
                f"+callbacks.record_weights.path={tmp_path / 'weights'}",
                f"hydra.run.dir={tmp_path / f'node{node}'}",
            ]
            processes.append(start_node(node, port, args, tmp_path / f"node{node}.out"))
        deadline = time.monotonic() + 240
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for node, process in enumerate(processes):
        assert process.returncode == 0, (tmp_path / f"node{node}.out").read_text()[-3000:]

    steps_per_epoch = IMAGES // (2 * BATCH)
    total = steps_per_epoch * EPOCHS
    records = [json.loads((tmp_path / f"weights.rank{rank}.json").read_text()) for rank in range(2)]
    for rank, record in enumerate(records):
        assert (record["global_rank"], record["node_rank"], record["world_size"], record["num_nodes"]) == (
            rank,
            rank,
            2,
            2,
        )
        assert record["global_step"] == total
        # The lr scales with the global batch: 2 nodes x 1 process x 2 images.
        assert record["initial_lr"] == BASE_LR * (2 * BATCH) / 16
    # Both nodes start from and end with the same weights, and training changed them.
    assert records[0]["start"] == records[1]["start"] and records[0]["end"] == records[1]["end"]
    assert records[0]["end"] != records[0]["start"]

    # Every image once per epoch across the two nodes, in a new order each epoch.
    batches = [read_records(tmp_path / f"batches{node}.jsonl") for node in range(2)]
    assert [step for step, _ in batches[0]] == [step for step, _ in batches[1]] == list(range(total))
    epochs = []
    for epoch in range(EPOCHS):
        steps = range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        seen = [image for node in batches for step, ids in node if step in steps for image in ids]
        assert sorted(seen) == list(range(1, IMAGES + 1))
        epochs.append([ids for step, ids in batches[0] if step in steps])
    assert epochs[0] != epochs[1]

    # Rank 0's node holds the run's outputs; each node logs its own process.
    assert json.loads((tmp_path / "node0" / "metrics.json").read_text())["world_size"] == 2
    assert (tmp_path / "node0" / "checkpoints" / "last.ckpt").exists()
    assert f"process 1 of 2 done at global step {total}" in (tmp_path / "node1" / "run.log").read_text()


def test_ctrl_c_ends_the_wait_for_a_node_that_never_starts(tmp_path):
    # Node 0 of 2 alone: its process waits in torch's C++ code (the TCP store) for node 1, where Python's SIGINT
    # handler never runs. Before mrcnn.engine.process_meeting, this wait outlived every Ctrl-C for 30 minutes.
    args = [*TINY_RUN, "trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2", f"hydra.run.dir={tmp_path}"]
    out_path = tmp_path.parent / "node0.out"
    process = start_node(0, free_port(), args, out_path)
    try:
        deadline = time.monotonic() + 120
        while "Initializing distributed" not in out_path.read_text():  # Lightning's line as it calls into torch
            assert process.poll() is None and time.monotonic() < deadline, out_path.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # well inside the wait
        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert returncode == -signal.SIGINT, out_path.read_text()[-3000:]  # ended by the signal: a shell's 130
    log = out_path.read_text()
    assert "node 0 of 2: its processes meet the others at 127.0.0.1" in log and "Ctrl-C (or kill " in log
    assert not (tmp_path / "checkpoints").exists()  # nothing trained, nothing saved
