"""Entry point: `python run.py [group=option ...] [key=value ...]`; `-m` sweeps. See README.md."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mrcnn.config import check_model_contract  # (importing it registers the config resolvers)
from mrcnn.engine.launch import discard_unused_output, pin_ddp_child_to_its_job
from mrcnn.engine.predict import predict
from mrcnn.engine.train import evaluate, train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    modes = {"train": train, "evaluate": evaluate, "predict": predict}
    try:
        check_model_contract(cfg)
        if cfg.mode not in modes:
            raise ValueError(f"mode must be one of {sorted(modes)}, got {cfg.mode!r}")
        metrics = modes[cfg.mode](cfg)
    except BaseException:
        # A job that failed before writing anything leaves no empty output folder behind.
        discard_unused_output(HydraConfig.get().runtime.output_dir)
        raise
    # The returned value is what Hydra sweepers optimise.
    return metrics.get("segm_AP")


if __name__ == "__main__":
    pin_ddp_child_to_its_job()
    main()
