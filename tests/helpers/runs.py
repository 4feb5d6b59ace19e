"""Running ``run.py`` as a user would, at a tiny setting, and recording what a training run saw."""

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest

from tests.helpers.config import ROOT, TINY_MODEL

# One short epoch of the tiny model, validated at its end, every step logged; tests add the data sizes.
TINY_RUN = [
    *TINY_MODEL,
    "trainer.max_epochs=1",
    "trainer.check_val_every_n_epoch=1",
    "trainer.log_every_n_steps=1",
]


def load_script(path: Path):
    """A script of ``benchmarks/`` as a module (the folder is not a package), named after its file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_process(command, timeout=300, env=None, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, **kwargs)``, except for a process that hangs.

    At ``timeout`` every process it started (its DDP processes and their loader workers among them, all in a session
    of its own) prints where each of its threads was (Python's faulthandler, on SIGABRT) and ends, and the test fails
    with those stacks: a hang in CI says where it was, and leaves no process behind.
    """
    env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Every process is stopped first, then each prints its stacks and ends alone: the dumps do not interleave on
        # the shared stderr, and no process moves on (a DDP peer's collective failing, say) after another one ended.
        # The last started first: the command's own process (a DDP job's rank zero) is dumped last, where the end of
        # a log (all that CI shows of a long one) has it, after its peers and before them their loader workers.
        _signal_session(process.pid, signal.SIGSTOP)
        labels = []
        for pid in reversed(session_processes(process.pid)):
            labels.append(f"pid {pid}: {_command_line(pid)}")
            _abort_one(pid)
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a process that outlived its abort
            _signal_session(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        _signal_session(process.pid, signal.SIGKILL)
        pytest.fail(
            f"{shlex.join(map(str, command))} did not end within {timeout} s. Its output's end:\n{stdout[-2000:]}\n"
            f"{_without_dumps(stderr)[-3000:]}\nWhere each of its processes' threads was then (innermost frames "
            f"first):\n{compact_stacks(stderr, labels=labels)}",
            pytrace=False,
        )
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _signal_session(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signum)


def session_processes(session: int) -> list[int]:
    """The processes of a session (``/proc``) that run, in the order they started."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat_fields(int(entry.name))
        if fields is not None and int(fields[3]) == session and fields[0] not in ("Z", "X"):
            found.append((int(fields[19]), int(entry.name)))  # field 22 of proc(5): the start time
    return [pid for _, pid in sorted(found)]


def _abort_one(pid: int, wait: float = 5.0) -> None:
    """SIGABRT to one stopped process, then lets it run and waits (at most ``wait`` seconds) until it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGABRT)
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + wait
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not: an orphan's, which a container's first process may never
    reap, stays one)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command's name (proc(5)'s fields 3 on: state, ..., session at
    index 3, ...); ``None`` for a process that is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


# faulthandler's dump: a header per thread, then its frames; after the threads, the list of extension modules.
_THREAD = re.compile(r"^(Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):$")
_FRAME = re.compile(r'^  File "(?P<path>[^"]+)", line (?P<line>\d+) in (?P<name>.+)$')


def _without_dumps(text: str) -> str:
    """``text`` without faulthandler's lines."""
    lines = text.splitlines()
    kept = [
        line
        for line in lines
        if not (
            _THREAD.match(line) or _FRAME.match(line) or line.startswith(("Fatal Python error", "Extension modules"))
        )
    ]
    return "\n".join(kept)


def _command_line(pid: int, limit: int = 150) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return "?"
    return shlex.join(word.decode(errors="replace") for word in words)[:limit]


def compact_stacks(text: str, frames: int = 14, labels: list[str] | None = None) -> str:
    """faulthandler's dumps in ``text``, short: each thread's ``frames`` innermost frames, a line each, paths from
    ``site-packages`` (or the file name) on; the list of extension modules left out.

    ``labels``: what each dump's process was, in the order of the dumps (:func:`run_process` aborts one process at a
    time); used only when there are as many as dumps, else each dump is "a process".
    """
    dumps = sum(line.startswith("Fatal Python error") for line in text.splitlines())
    names = iter(labels if labels is not None and len(labels) == dumps else ["a process"] * dumps)
    out = []
    kept = 0
    for line in text.splitlines():
        if line.startswith("Fatal Python error"):
            out.append(f"-- {next(names)}: {line}")
        elif _THREAD.match(line):
            out.append(f" {line.split(' (')[0]}:")
            kept = 0
        elif match := _FRAME.match(line):
            kept += 1
            if kept <= frames:
                path = match["path"].split("site-packages/")[-1]
                if path == match["path"]:
                    path = Path(path).name
                out.append(f"    {path}:{match['line']} {match['name']}")
            elif kept == frames + 1:
                out.append("    ...")
    return "\n".join(out) or "(no stacks printed)"


def run_py(args, cwd=ROOT, env=None, timeout=300, check=True) -> subprocess.CompletedProcess:
    """Runs ``python run.py *args`` in ``cwd`` (:func:`run_process`); with ``check``, fails the test (with the
    output's tail) on a non-zero exit."""
    result = run_process([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


class RecordTrainBatches(L.Callback):
    """Test-only: appends ``[global step, image ids]`` of every training batch to a JSON-lines file."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _, targets = batch
        with self.path.open("a") as file:
            file.write(json.dumps([trainer.global_step, [int(t["image_id"]) for t in targets]]) + "\n")


class RecordWeights(L.Callback):
    """Test-only: writes ``<path>.rank<global rank>.json`` at the start and end of training.

    It holds the process's ranks, world size, global step, the optimizer's initial learning rate and a
    SHA-256 digest of the model's state dict at the start and at the end, so processes of one DDP job
    (on different "nodes") can be compared.
    """

    def __init__(self, path: str):
        self.path = Path(path)
        self._start = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = state_digest(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        group = trainer.optimizers[0].param_groups[0]
        record = {
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "global_step": trainer.global_step,
            "initial_lr": group.get("initial_lr", group["lr"]),
            "start": self._start,
            "end": state_digest(pl_module),
        }
        self.path.with_name(f"{self.path.name}.rank{trainer.global_rank}.json").write_text(json.dumps(record))


def state_digest(module) -> str:
    """SHA-256 of a module's state dict: every tensor's name and bytes, in order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def training_only_trainer(**kwargs) -> L.Trainer:
    """A Lightning Trainer for a few training steps in a test: CPU, no logger, checkpoints, progress bar or
    validation; ``kwargs`` (``max_steps=...``, ``callbacks=...``) are added or override."""
    settings = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**settings, **kwargs})


class InterruptAt(L.Callback):
    """Test-only: sends this process SIGINT (Ctrl-C), or ``signum``, during training step ``step - 1``.

    ``mrcnn.engine.callbacks.LastCheckpoint`` finishes that step, saves ``last.ckpt`` at global step ``step`` and stops
    the run with ``TrainingInterrupted``: a run stopped by a user at step ``step``, in the test's own process.
    """

    def __init__(self, step: int, signum: int = signal.SIGINT):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)


class ShouldStopAt(L.Callback):
    """Test-only: sets ``trainer.should_stop`` after training step ``step - 1``, as early stopping or a timer would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


class NotReadyEvent:
    """A CUDA event whose copy has not arrived: what :class:`mrcnn.lit_module.LossWatch` holds on a GPU between a
    step and the read of its losses, for tests on the CPU."""

    def query(self):
        return False

    def synchronize(self):
        pass


def fake_scontrol(tmp_path: Path, calls: Path, exit_code: int = 0, terminate_caller: bool = False) -> Path:
    """A folder holding a stand-in for SLURM's ``scontrol``: it appends its arguments to ``calls`` and exits with
    ``exit_code`` (saying why on stderr when that is not 0). ``terminate_caller``: it sends its caller SIGTERM
    first, as SLURM sends a job's processes when it requeues the job."""
    folder = tmp_path / "slurm-bin"
    folder.mkdir(exist_ok=True)
    script = folder / "scontrol"
    why = 'echo "scontrol: error: Requeue of job is disabled" >&2' if exit_code else ""
    terminate = "kill -TERM $PPID" if terminate_caller else ""
    script.write_text(f'#!/bin/sh\n{terminate}\necho "$@" >> "{calls}"\n{why}\nexit {exit_code}\n')
    script.chmod(0o755)
    return folder
