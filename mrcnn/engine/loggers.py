"""Loggers from their configs: the CSV log that a resumed run continues, and W&B that never prompts and knows its job."""

import csv
import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from mrcnn.config import as_written, override_key, task_overrides
from mrcnn.engine.checkpoints import ResumedRun


def writes_train_metrics(trainer) -> bool:
    """Whether the training step now running is one whose step metrics reach the loggers.

    Lightning writes a step's metrics only every ``trainer.log_every_n_steps`` steps (and at every step of
    ``fast_dev_run``), but ``self.log`` costs host time at every call: the module's and the throughput callback's
    eight calls a step took 2.5 ms of the 5 ms that run.py's loop spent per step around the model
    (``benchmarks/loop_overhead.py`` on this project's CPU), where a 30-steps/s GPU step has 33 ms in all. Training
    code logs when this is true, which writes the same rows. The epoch's last batch counts too, so what callbacks read
    at the epoch's end (``trainer.callback_metrics``: a checkpoint or early stop on a training loss) is that batch's
    value, as when every step logs. Between logging steps ``callback_metrics`` keeps the last logged step's values.

    Lightning's own ``LearningRateMonitor`` and ``ThroughputMonitor`` ask the same private property; where a Lightning
    version lacks it, every step logs.
    """
    connector = getattr(trainer, "_logger_connector", None)
    should_update = getattr(connector, "should_update_logs", True)
    return bool(should_update or trainer.fast_dev_run or trainer.is_last_batch)


def instantiate_loggers(cfg: DictConfig, resumed: ResumedRun | None = None) -> list:
    """The loggers named under ``cfg.logger`` (``{name: logger config}``; a null entry is switched off).

    Args:
        resumed: the run this one resumes: the CSV log and the W&B run continue its own.
    """
    return [instantiate_logger(c, cfg, resumed) for c in (cfg.get("logger") or {}).values() if c is not None]


def instantiate_logger(logger_cfg: DictConfig, cfg: DictConfig, resumed: ResumedRun | None = None):
    """A logger from its config; a ``WandbLogger`` also gets the settings of :func:`wandb_settings`.

    When resuming, a :class:`ContinuedCSVLogger` starts from the resumed run's metrics history and a
    ``WandbLogger`` continues the resumed run's W&B run (its id is in the checkpoint).
    """
    if builds_wandb_logger(logger_cfg):
        settings = wandb_settings(
            logger_cfg, cfg, resumed.wandb_run_id if resumed else None, resumed.wandb_labels if resumed else None
        )
        # `config` is also the name of instantiate()'s own first parameter: pass it to the partial.
        config = settings.pop("config")
        logger = instantiate(logger_cfg, _partial_=True, **settings)(config=config)
        # Lightning always passes wandb.init an `anonymous` value (None by default), which current wandb
        # answers with "The anonymous setting has no effect": leave the deprecated setting out instead.
        logger._wandb_init.pop("anonymous", None)
        return logger
    logger = instantiate(logger_cfg)
    if resumed is not None and isinstance(logger, ContinuedCSVLogger):
        history = resumed_metrics_file(logger, cfg.run_dir, resumed)
        own = Path(logger.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if not history.is_file() and own.is_file():
            history = own  # this folder's own log, rather than an empty history over it
        logger.continue_history(history, before_step=resumed.global_step)
    return logger


def builds_wandb_logger(logger_cfg: DictConfig | dict | None) -> bool:
    """Whether a logger config's ``_target_`` is Lightning's ``WandbLogger`` or a subclass of it."""
    target = (logger_cfg or {}).get("_target_")
    if not target:
        return False
    try:
        logger_class = get_class(str(target))
    except (ImportError, ValueError):  # not a class: instantiating it says what is wrong
        return False
    return issubclass(logger_class, WandbLogger)


def resumed_metrics_file(logger: CSVLogger, run_dir: str, resumed: ResumedRun) -> Path:
    """The ``metrics.csv`` the resumed run wrote: at the same place inside its run folder (where it is now) as this
    logger's."""
    log_dir = Path(logger.log_dir)
    try:
        return resumed.folder / log_dir.relative_to(run_dir) / ExperimentWriter.NAME_METRICS_FILE
    except ValueError:  # a log folder outside the run folder: the same one
        return log_dir / ExperimentWriter.NAME_METRICS_FILE


class ContinuedCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` that a resumed run continues instead of starting over.

    Lightning's CSV writer deletes ``metrics.csv`` when its folder has one, so a run resumed into its own
    folder kept only the rows from the resumed step on. With :meth:`continue_history` the log starts with
    the resumed run's rows of the steps before the checkpoint (from its own ``metrics.csv``, in this
    folder or the resumed run's), and the resumed run appends to them: ``metrics.csv`` holds the whole
    history. Rows the interrupted run wrote after its checkpoint are left out: the resumed run trains
    those steps again and logs them itself. Without it, it is Lightning's ``CSVLogger``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._history: list[dict] | None = None  # rows to start from; None: start over, as Lightning does
        self._history_columns: list[str] = []

    def continue_history(self, metrics_file: str | Path, before_step: int) -> None:
        """Starts this log with the rows of ``metrics_file`` logged at steps before ``before_step``.

        Call it before anything is logged. A missing file (the run was killed before it wrote a row) is an
        empty history.
        """
        metrics_file = Path(metrics_file)
        rows, columns = [], []
        if metrics_file.is_file():
            with metrics_file.open(newline="") as file:
                reader = csv.DictReader(file)
                columns = list(reader.fieldnames or [])
                rows = [row for row in reader if row.get("step") and int(float(row["step"])) < before_step]
        self._history, self._history_columns = rows, columns

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self._history is not None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self._history, self._history_columns)
        return CSVLogger.experiment.fget(self)


class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer, starting from earlier rows instead of deleting the file."""

    def __init__(self, log_dir: str, rows: list[dict], columns: list[str]):
        super().__init__(log_dir)
        # The writer rewrites the file with the union of the columns when new ones appear: it must know these.
        self.metrics_keys = sorted(columns)
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)

    def _check_log_dir_exists(self) -> None:
        # Lightning deletes metrics.csv here; this writer rewrites it with the history instead.
        pass


def wandb_settings(
    logger_cfg: DictConfig, cfg: DictConfig, resumed_id: str | None = None, resumed_labels: dict | None = None
) -> dict:
    """``wandb.init`` arguments derived from the job, for the keys the logger config leaves null.

    * ``config``: the full resolved config, given at init so that offline runs keep it too.
    * ``mode``: :func:`wandb_mode`, so a job never stops at a login prompt.
    * ``name``: the variant, Hydra's ``override_dirname`` (e.g. ``model/pooler=roi_pool``).
    * ``group``: the experiment (``experiment_name``, else the ``experiment=`` file, else the sweep folder).
    * ``tags``: the job's command-line overrides.

    With ``resumed_id`` (the W&B run of the run being resumed) it is ``id``: Lightning's ``WandbLogger``
    initialises with ``resume="allow"``, so W&B continues that run. Its name, group and tags are the resumed run's
    (``resumed_labels``, from its checkpoint), not this job's (whose overrides hold ``resume=...``): given again,
    because a run that never reached W&B's server (offline, not synced) would be continued online without them.
    """
    settings = {"config": OmegaConf.to_container(cfg, resolve=True)}
    if logger_cfg.get("mode") is None:
        settings["mode"] = wandb_mode()
    if resumed_id is not None and logger_cfg.get("id") is None:
        settings["id"] = resumed_id
        for key, value in (resumed_labels or {}).items():
            if key in ("name", "group", "tags") and logger_cfg.get(key) is None:
                settings[key] = value
        return settings
    if not HydraConfig.initialized():
        return settings
    hydra_cfg = HydraConfig.get()
    # As written (mrcnn.config.as_written): the overrides it joins may hold an interpolation.
    variant = as_written(hydra_cfg.job).get("override_dirname")
    if logger_cfg.get("name") is None and variant:
        settings["name"] = variant
    if logger_cfg.get("group") is None:
        group = hydra_cfg.runtime.choices.get("experiment")
        if group is None and hydra_cfg.mode == RunMode.MULTIRUN:
            group = str(hydra_cfg.sweep.dir)
        settings["group"] = group
    if logger_cfg.get("tags") is None:
        # W&B refuses tags longer than 64 characters.
        settings["tags"] = [o[:64] for o in task_overrides(hydra_cfg) if not override_key(o).startswith("hydra")]
    return settings


def wandb_mode() -> str:
    """``WANDB_MODE`` when set; else the mode ``wandb offline`` / ``wandb disabled`` wrote to W&B's settings files;
    else ``online`` when W&B credentials exist, ``offline`` when not.

    Credentials are ``WANDB_API_KEY`` (or ``WANDB_IDENTITY_TOKEN_FILE``) or a netrc entry for the W&B server (what
    ``wandb login`` writes): ``WANDB_BASE_URL``, else the ``base_url`` that ``wandb login --host`` wrote to the settings
    files, else W&B's cloud. Offline runs are uploaded later with ``wandb sync <run dir>/wandb``.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    settings = wandb_settings_files()
    mode = settings.get("mode")
    if mode in ("offline", "dryrun", "disabled"):
        return "offline" if mode == "dryrun" else mode
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online"
    base_url = os.environ.get("WANDB_BASE_URL") or settings.get("base_url")
    # W&B's cloud under its names old and new (wandb 0.31 calls it api.forge.coreweave.com).
    servers = [base_url] if base_url else ["https://api.wandb.ai", "https://api.forge.coreweave.com"]
    try:
        entries = netrc.netrc(os.environ.get("NETRC"))
    except (OSError, netrc.NetrcParseError):
        return "offline"
    for server in servers:
        parts = urlsplit(server if "//" in server else f"//{server}")
        # wandb writes the host with its port (a self-hosted server's http://localhost:8080 is localhost:8080).
        if any(entries.authenticators(name) for name in {parts.netloc, parts.hostname} if name):
            return "online"
    return "offline"


def wandb_settings_files() -> dict[str, str]:
    """The ``[default]`` keys of W&B's settings files: the global one (``$WANDB_CONFIG_DIR/settings``, else
    ``~/.config/wandb/settings``), then the workspace's (``./wandb/settings``, where ``wandb offline`` writes)."""
    import configparser

    config_dir = os.environ.get("WANDB_CONFIG_DIR") or os.path.join(os.path.expanduser("~"), ".config", "wandb")
    values: dict[str, str] = {}
    for path in (os.path.join(config_dir, "settings"), os.path.join("wandb", "settings")):
        parser = configparser.ConfigParser(interpolation=None)  # a value may hold a "%" (an api key, a URL)
        try:
            parser.read(path)
        except (OSError, configparser.Error):
            continue
        if parser.has_section("default"):
            values.update(parser["default"])
    return values
