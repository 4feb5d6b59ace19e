"""Loggers from their configs: the CSV log, and W&B that never prompts and knows its job."""

import netrc
import os
from urllib.parse import urlsplit

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def instantiate_loggers(cfg: DictConfig) -> list:
    """The loggers named under ``cfg.logger`` (``{name: logger config}``; a null entry is switched off)."""
    return [instantiate_logger(c, cfg) for c in (cfg.get("logger") or {}).values() if c is not None]


def instantiate_logger(logger_cfg: DictConfig, cfg: DictConfig):
    """A logger from its config; a ``WandbLogger`` also gets the settings of :func:`wandb_settings`."""
    if str(logger_cfg.get("_target_", "")).endswith("WandbLogger"):
        settings = wandb_settings(logger_cfg, cfg)
        # `config` is also the name of instantiate()'s own first parameter: pass it to the partial.
        config = settings.pop("config")
        return instantiate(logger_cfg, _partial_=True, **settings)(config=config)
    return instantiate(logger_cfg)


def wandb_settings(logger_cfg: DictConfig, cfg: DictConfig) -> dict:
    """``wandb.init`` arguments derived from the job, for the keys the logger config leaves null.

    * ``config``: the full resolved config, given at init so that offline runs keep it too.
    * ``mode``: :func:`wandb_mode`, so a job never stops at a login prompt.
    * ``name``: the variant, Hydra's ``override_dirname`` (e.g. ``model/pooler=roi_pool``).
    * ``group``: the experiment (``experiment_name``, else the ``experiment=`` file, else the sweep folder).
    * ``tags``: the job's command-line overrides.
    """
    settings = {"config": OmegaConf.to_container(cfg, resolve=True)}
    if logger_cfg.get("mode") is None:
        settings["mode"] = wandb_mode()
    if not HydraConfig.initialized():
        return settings
    hydra_cfg = HydraConfig.get()
    if logger_cfg.get("name") is None and hydra_cfg.job.override_dirname:
        settings["name"] = hydra_cfg.job.override_dirname
    if logger_cfg.get("group") is None:
        group = hydra_cfg.runtime.choices.get("experiment")
        if group is None and hydra_cfg.mode == RunMode.MULTIRUN:
            group = str(hydra_cfg.sweep.dir)
        settings["group"] = group
    if logger_cfg.get("tags") is None:
        # W&B refuses tags longer than 64 characters.
        settings["tags"] = [o[:64] for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith("hydra")]
    return settings


def wandb_mode() -> str:
    """``WANDB_MODE`` when set; else ``online`` when W&B credentials exist, ``offline`` when not.

    Credentials are ``WANDB_API_KEY`` (or ``WANDB_IDENTITY_TOKEN_FILE``) or a netrc entry for the W&B
    host (what ``wandb login`` writes). Offline runs are uploaded later with ``wandb sync <run dir>/wandb``.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online"
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"
