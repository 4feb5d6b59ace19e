"""hydra/launcher=slurm (hydra-submitit-launcher): one SLURM task per GPU, sized from the trainer config (no SLURM needed)."""

import submitit
from hydra.utils import instantiate
from submitit.slurm.slurm import _make_sbatch_string

from mrcnn.config import compose_config

SLURM = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]


def compose_with_hydra(overrides, sweep_dir):
    return compose_config([*overrides, f"hydra.sweep.dir={sweep_dir}"], return_hydra_config=True)


def test_launcher_config_has_one_task_per_gpu(tmp_path):
    cfg = compose_with_hydra([*SLURM, "hydra.launcher.timeout_min=90", "hydra.launcher.partition=gpu"], tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.timeout_min == 90 and launcher.partition == "gpu"
    assert launcher.submitit_folder == f"{tmp_path}/.submitit/%j"


def sbatch_script(cfg, tmp_path, monkeypatch) -> tuple[dict, str]:
    """The SLURM parameters submitit gets for a sweep of ``cfg``, and the sbatch script it would submit."""
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg

    # Stop where the plugin would submit, keeping the executor it configured.
    submitted = {}

    def capture(executor, fn, *iterables):
        submitted["executor"] = executor
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    # submitit checks for srun before it builds a SLURM executor; this machine has none.
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    launcher.launch([["base_lr=0.01"], ["base_lr=0.02"]], initial_job_idx=0)
    parameters = submitted["executor"]._executor.parameters
    return parameters, _make_sbatch_string(
        command="python -u -m submitit.core._submit", folder=str(tmp_path), **parameters
    )


def test_submitit_gets_the_slurm_parameters(tmp_path, monkeypatch):
    cfg = compose_with_hydra([*SLURM, "hydra.launcher.timeout_min=90"], tmp_path)
    parameters, sbatch = sbatch_script(cfg, tmp_path, monkeypatch)
    assert parameters["nodes"] == 2 and parameters["ntasks_per_node"] == 4 and parameters["gpus_per_node"] == 4
    assert parameters["time"] == 90
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "#SBATCH --time=90"):
        assert line in sbatch
    # The notice before the time limit that makes a job save last.ckpt and requeue itself (README, "Stopping").
    assert "#SBATCH --signal=USR2@120" in sbatch
    # srun ends a job's other tasks when one fails (they would wait for it in NCCL until the group's timeout).
    assert sbatch.index("export SLURM_KILL_BAD_EXIT=1") < sbatch.index("srun ")


def test_a_sweep_that_trains_on_the_cpu_asks_slurm_for_no_gpu(tmp_path, monkeypatch):
    # The default setting=cpu, and CPU processes (trainer=ddp_cpu): one task per process, no GPU.
    for overrides, tasks in (([], 1), (["trainer=ddp_cpu", "trainer.devices=4"], 4)):
        cfg = compose_with_hydra(["hydra/launcher=slurm", *overrides], tmp_path)
        parameters, sbatch = sbatch_script(cfg, tmp_path, monkeypatch)
        assert "gpus_per_node" not in parameters and "--gpus" not in sbatch, sbatch
        assert f"#SBATCH --ntasks-per-node={tasks}" in sbatch
