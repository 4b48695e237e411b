"""Every MLflow tag name and Optuna user-attr name the package writes or reads, spelled once.

Their values are part of the on-disk format: stores written by earlier versions must still read,
so a name here never changes.
"""

# -- MLflow tags of a sweep's parent run
ROLE = "sweep.role"  # "parent" on a sweep's parent run
PARENT_ROLE = "parent"
STUDY_NAME = "sweep.study_name"  # parent and trial runs
STORAGE = "sweep.storage"  # parent: the study's storage
FOLDER = "sweep.folder"  # parent: the sweep folder; also a trial's user attr: its run folder
SAMPLER = "sweep.sampler"
PRUNER = "sweep.pruner"  # parent tag; also the study's user attr {name, kwargs}
N_TRIALS = "sweep.n_trials"
OBJECTIVE = "sweep.objective"  # "metric (direction), ..."
FIXED_OVERRIDES = "sweep.fixed_overrides"
SPACE_PREFIX = "space."  # space.<key>: the search dimension of <key>, as written on the command line
BEST_PREFIX = "best."  # best.<key>: the best trial's value of <key>
BEST_TRIAL = "best.trial_number"
BEST_TRIALS = "best.trial_numbers"  # the Pareto front of a multi-objective sweep, "3,5"

# -- MLflow tags of a trial's run
TRIAL_NUMBER = "sweep.trial_number"
STATE = "sweep.state"  # the trial's Optuna state: COMPLETE | PRUNED | FAIL
ERROR = "sweep.error"  # why the trial failed; also its user attr
INTERRUPTED = "sweep.interrupted"  # its sweeper died (or was stopped) while it ran; also its user attr
RESUMED_FROM = "sweep.resumed_from"  # the interrupted trial whose checkpoint it went on from; also its user attr
# the failed trial whose finished training (its metrics.json) it completes, not trained again;
# also its user attr
RECOVERED_FROM = "sweep.recovered_from"
RUN_DIR = "run_dir"  # any run: its run folder
RUN_OWNER = "run_owner"  # any run: "host:pid" of its process; left RUNNING by a dead one, it ends KILLED
PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own nesting tag
DATA_CONTEXT = "mlflow.data.context"
REGISTERED_MODEL = "best.registered_model"  # parent: the registered model version of the best trial
CACHES_BUILT = "caches_built"  # any run (tag, and key of metrics.json): the shared caches it built, in its duration
MODEL_ID = "model_id"  # any run that logged its trained model (train.save_model=true): the MLflow model id  # a run input's role: train, eval
PACK = "sweep.pack"  # a trial trained in a pack (hydra.sweeper.pack): the pack's trial numbers, "4,5,6,7"
NOTE = "mlflow.note.content"  # MLflow's run description (markdown), shown on the run's page
# -- MLflow experiment tags
# What MLflow 3's UI opens an experiment on: without it, the GenAI overview; this value: the runs.
EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"

# -- Optuna study user attrs
PARENT_ATTR = "mlflow.parent_run_id"  # the sweep's MLflow run, kept across resumes
PARENT_URI_ATTR = "mlflow.tracking_uri"

# -- Optuna trial user attrs (besides FOLDER, ERROR, INTERRUPTED and RESUMED_FROM above)
OWNER = "sweep.owner"  # "host:pid" of the sweeper that asked the trial
