"""The Optuna sweeper behind `python -m dpo_sweep ... -m`, one module a concern:

| module | owns |
| --- | --- |
| `settings` | `hydra.sweeper.*`, typed and checked |
| `space` | the search space: Hydra sweep overrides to Optuna distributions, grid points |
| `study` | storage, study creation and resumption, sampler, pruner, trials a dead sweeper left |
| `state` | `Sweep`: what one invocation works with |
| `placement` | a trial's folder and overrides, its GPU (its worker slot's) among parallel trials |
| `resume` | interrupted points run again from their checkpoints |
| `lineage` | the MLflow parent run and the tags of each trial's run |
| `loop` | prepare, then run the trials until done (`run_sweep`), batch by batch or dispatched |
| `trials` | one trial's life: asked, launched through Hydra's launcher, told; failures counted |
| `dispatch` | with joblib and `n_jobs > 1`: a trial the moment a worker slot frees up |
| `packs` | `pack > 1`: LoRA trials of a batch packed into one job a pack; members' folders, results |
| `summary` | the end: optimization_results.yaml, the table, the parent's results and plots |

The Hydra plugin (`hydra_plugins/dpo_sweep_sweeper`) calls `run_sweep`. A trial reports its evals
to the study itself (`dpo_sweep.trial_report`). Only this package and that module import optuna.

The names below are importable from `dpo_sweep.sweep` as well as from their modules.
"""

from dpo_sweep.sweep.lineage import child_runs, open_parent, run_tags, settle_child_runs, tag_child_runs
from dpo_sweep.sweep.dispatch import Workers, dispatches, run_dispatched
from dpo_sweep.sweep.loop import prepare, run_batches, run_sweep
from dpo_sweep.sweep.packs import MemberResult, TrialFailed, launch_packed, member_results, write_member_folder
from dpo_sweep.sweep.trials import FolderResult, ask_at, ask_batch, launch, pending_points, tell
from dpo_sweep.sweep.placement import (JOBLIB_LAUNCHER, PLACEMENT_KEYS, gpu_slots, job_dir, launcher_target, pin_gpus,
                                       pins_gpus, trial_overrides)
from dpo_sweep.sweep.resume import (checkpoint_file, checkpoint_step, place_file, resume_from_checkpoint,
                                    resume_source, retry_points, same_training, training_overrides)
from dpo_sweep.sweep.settings import PRUNERS, SAMPLERS, SweepSettings, check_grid
from dpo_sweep.sweep.space import in_space
from dpo_sweep.sweep.state import Sweep, SweepError
from dpo_sweep.sweep.study import (build_pruner, build_sampler, is_finished, open_storage, open_study, owner_id,
                                   recover_interrupted, storage_location, trial_id)
from dpo_sweep.sweep.summary import finish, results_table, write_results

__all__ = [
    "FolderResult", "JOBLIB_LAUNCHER", "MemberResult", "PLACEMENT_KEYS", "PRUNERS", "SAMPLERS", "Sweep", "SweepError",
    "SweepSettings", "TrialFailed", "Workers", "ask_at", "ask_batch", "build_pruner", "build_sampler", "check_grid",
    "checkpoint_file", "checkpoint_step", "child_runs", "dispatches", "finish", "gpu_slots", "in_space", "is_finished",
    "job_dir", "launch", "launch_packed", "launcher_target", "member_results", "open_parent", "open_storage",
    "open_study", "owner_id", "pending_points", "pin_gpus", "pins_gpus", "place_file", "prepare",
    "recover_interrupted", "results_table", "resume_from_checkpoint", "resume_source", "retry_points", "run_batches",
    "run_dispatched", "run_sweep", "run_tags", "same_training", "settle_child_runs", "storage_location",
    "tag_child_runs", "tell", "training_overrides", "trial_id", "trial_overrides", "write_member_folder",
    "write_results",
]
