"""Entry point: `python run.py [group=option ...] [key=value ...]`; `-m` sweeps. See README.md."""

import sys

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig

# Only light modules before Hydra composes: a mistyped override or a bad value fails in about a second, before
# torch and Lightning are loaded (several seconds), which the mode's own module imports.
from mrcnn.config import (  # (registers the resolvers)
    check_ablation_overrides,
    check_added_keys,
    check_group_overrides,
    check_model_contract,
    hydra_group_options,
    where_built,
)
from mrcnn.engine.config_checks import check_config
from mrcnn.engine.launch import discard_unused_output, pin_ddp_child_to_its_job
from mrcnn.engine.quiet import silence_library_noise

MODES = ("train", "evaluate", "predict")


def check_command(cfg: DictConfig) -> None:
    """The checks that answer a mistake in the command (a typo, a bad value, a missing file) before torch loads."""
    check_model_contract(cfg)
    check_added_keys(
        cfg,
        HydraConfig.get().overrides.task,
        hydra_group_options,
        HydraConfig.get().runtime.choices,
        recompose=lambda overrides: compose(config_name=HydraConfig.get().job.config_name, overrides=overrides),
        hydra_cfg=HydraConfig.get(),
    )
    check_ablation_overrides(HydraConfig.get().runtime.choices, HydraConfig.get().overrides.task)
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {cfg.mode!r}")
    check_config(cfg)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        try:
            check_command(cfg)
        except (ValueError, FileNotFoundError, RuntimeError) as error:
            if HydraConfig.get().mode != RunMode.RUN:
                raise  # a sweep's job: Hydra records it as failed, and the sweep's callbacks see it
            # The message alone, as for a group picked with a dot below: the checks' traceback says nothing more.
            raise SystemExit(f"{type(error).__name__}: {error}") from None
        if cfg.mode == "predict":
            from mrcnn.engine.predict import predict as run_mode
        else:
            from mrcnn.engine import train as train_module

            run_mode = getattr(train_module, cfg.mode)
        silence_library_noise()  # after the mode's module has imported Lightning, before its first message
        metrics = run_mode(cfg)
    except BaseException as error:
        # A job that failed before writing anything leaves no empty output folder behind.
        discard_unused_output(HydraConfig.get().runtime.output_dir)
        if isinstance(error, InstantiationException):
            # Hydra names where the object is built; say which key and config group wrote it. (evaluate and predict
            # build the model a checkpoint records, whose options this command's choices do not name.)
            choices = HydraConfig.get().runtime.choices
            if cfg.mode != "train":
                choices = {group: option for group, option in choices.items() if not group.startswith("model")}
            raise InstantiationException(where_built(str(error), cfg, choices)) from error
        raise
    # The returned value is what Hydra sweepers optimise.
    return metrics.get("segm_AP")


if __name__ == "__main__":
    pin_ddp_child_to_its_job()
    try:
        check_group_overrides(sys.argv[1:])  # before Hydra, whose own message for this mistake misleads
    except ValueError as error:
        sys.exit(f"{type(error).__name__}: {error}")
    main()
