"""`python -m dpo_sweep [overrides] [-m]`: the Hydra entry point."""

import os
import sys

import hydra
from omegaconf import DictConfig

from dpo_sweep.config import register
from dpo_sweep.paths import conf_dir

register()

if int(os.environ.get("RANK", "0")) > 0:  # torchrun: only rank 0 writes the run folder and logs
    sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


@hydra.main(config_path=conf_dir(), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from dpo_sweep.run import run_from_cli, run_trial  # heavy imports after Hydra has parsed the command line

    if HydraConfig.get().mode == RunMode.MULTIRUN:  # a sweep's trial: the sweeper reports how it ended
        if cfg.sweep.pack:  # several trials in this process (hydra.sweeper.pack): one outcome each
            from dpo_sweep.packing.run import run_pack_job

            return run_pack_job(cfg)
        return run_trial(cfg)
    return run_from_cli(cfg)


if __name__ == "__main__":
    main()
