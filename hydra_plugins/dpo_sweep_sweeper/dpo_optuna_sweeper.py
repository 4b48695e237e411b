"""The Sweeper class Hydra instantiates; it hands each sweep to `dpo_sweep.sweep.run_sweep`."""

from typing import Any, List, Optional

from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class DPOOptunaSweeper(Sweeper):
    """Optuna 5 sweeper: grid or sampler, batches through Hydra's launcher, persistent study,
    pruning, one MLflow parent run. Settings: `hydra_plugins.dpo_sweep_sweeper.config`."""

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        self.settings = OmegaConf.create(settings)
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher: Optional[Launcher] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: List[str]) -> Any:
        """Run the sweep; a config, data or sweep error ends it with one `error: ...` line (exit
        2), Ctrl-C with one line naming the sweep folder and the command that resumes (exit 130)."""
        from dpo_sweep.sweep.loop import run_sweep  # optuna and mlflow load only when a sweep runs
        from dpo_sweep.sweep.summary import SWEEP_ERRORS, interrupted

        try:
            return run_sweep(self, arguments)
        except SWEEP_ERRORS as e:
            from dpo_sweep.preflight import exit_with

            exit_with(e)
        except KeyboardInterrupt:
            interrupted(str(self.config.hydra.sweep.dir))
