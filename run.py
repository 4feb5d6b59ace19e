"""Entry point: `python run.py [group=option ...] [key=value ...]`; `-m` sweeps. See README.md."""

import logging
import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig

# Only light modules before Hydra composes: a mistyped override or a bad value fails in about a second, before
# torch and Lightning are loaded (several seconds), which the mode's own module imports.
from mrcnn.config import check_group_overrides, where_built  # (registers the resolvers)
from mrcnn.engine.command_checks import COMMAND_ERRORS, check_command
from mrcnn.engine.launch import (
    continue_sweep_sentence,
    discard_unused_output,
    finished_earlier,
    is_ddp_child,
    loops_started,
    pin_ddp_child_to_its_job,
    port_in_use_message,
    record_failure_in_log,
    restore_run_record,
)
from mrcnn.engine.quiet import silence_library_noise
from mrcnn.errors import command_error_of


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    checked = started = False
    loops = loops_started()
    try:
        check_command(cfg, HydraConfig.get())
        checked = True
        earlier = finished_earlier(cfg)  # a job of a continued sweep that finished before: kept
        if earlier is not None:
            return earlier.get("segm_AP")
        if cfg.mode == "predict":
            from mrcnn.engine.predict import predict as run_mode
        else:
            from mrcnn.engine import train as train_module

            run_mode = getattr(train_module, cfg.mode)
        silence_library_noise()  # after the mode's module has imported Lightning, before its first message
        started = True
        metrics = run_mode(cfg)
    except BaseException as error:
        # A job that continued its folder's run and saved nothing leaves that run's record as it was; one that failed
        # before its loop started and before writing anything in a folder of its own leaves no empty output folder
        # behind. One that failed in its loop keeps its log, which then ends with the error.
        restored = restore_run_record(HydraConfig.get().runtime.output_dir)
        if loops_started() > loops:
            if isinstance(error, Exception) and not is_ddp_child():
                record_failure_in_log(error)
        elif not restored:
            discard_unused_output(HydraConfig.get().runtime.output_dir)
        if isinstance(error, KeyboardInterrupt):
            stopped_by_ctrl_c(started)
        # (A CommandError our resolvers or the model's builders raised comes wrapped by OmegaConf or Hydra.)
        command_error = command_error_of(error)
        if isinstance(error, InstantiationException) and command_error is None:
            # Hydra names where the object is built; say which key and config group wrote it. (evaluate and predict
            # build the model a checkpoint records, whose options this command's choices do not name.)
            choices = HydraConfig.get().runtime.choices
            if cfg.mode != "train":
                choices = {group: option for group, option in choices.items() if not group.startswith("model")}
            raise InstantiationException(where_built(str(error), cfg, choices)) from error
        in_use = port_in_use_message(error)
        if in_use is not None:
            if HydraConfig.get().mode == RunMode.RUN:
                raise SystemExit(in_use) from None
            raise RuntimeError(in_use) from error
        mistake = command_error is not None or (not checked and isinstance(error, COMMAND_ERRORS))
        if mistake and HydraConfig.get().mode == RunMode.RUN:
            # The message alone, as for a group picked with a dot below: the check's traceback says nothing more. (A
            # sweep's job raises it: Hydra records the job as failed, and the sweep's callbacks see it. Every job passed
            # check_command when the sweep started, SweepJobsPass; one fails it now if a file was removed since.)
            said = command_error or error
            raise SystemExit(f"{type(said).__name__}: {said}") from None
        raise
    # The returned value is what Hydra sweepers optimise.
    return metrics.get("segm_AP")


def stopped_by_ctrl_c(started: bool) -> None:
    """A Ctrl-C the mode's own stop handling did not take (before it: the imports, Hydra's start; after it: a second
    one while a stopped job's processes end): a stop, not a crash to trace back. Exits 130, with the command that
    continues the sweep in a sweep's job."""
    message = "stopped by SIGINT" + ("" if started else " before it started; nothing was saved")
    sweep = continue_sweep_sentence()
    if sweep is not None:
        message += f". {sweep}"
    print(message, file=sys.stderr)
    # An import of torch cut short leaves its loggers at the root's level (Hydra's INFO), and torch's exit hooks would
    # log their statistics.
    logging.getLogger("torch").setLevel(logging.WARNING)
    raise SystemExit(128 + signal.SIGINT) from None


if __name__ == "__main__":
    pin_ddp_child_to_its_job()
    try:
        check_group_overrides(sys.argv[1:])  # before Hydra, whose own message for this mistake misleads
    except ValueError as error:
        sys.exit(f"{type(error).__name__}: {error}")
    try:
        main()
    except KeyboardInterrupt:  # in Hydra's own start, before it calls main(): its folder, if made, holds nothing
        if HydraConfig.initialized():
            discard_unused_output(HydraConfig.get().runtime.output_dir)
        stopped_by_ctrl_c(started=False)
