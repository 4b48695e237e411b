"""Packed trials on the sweeper's side (`hydra.sweeper.pack`): a real sweeper instantiated by
Hydra over the real conf/, a real Optuna study, Hydra's basic launcher. The job it launches stands
in for the pack job (`PackJob`): it reads each member's config from the member's folder, as the
pack job does, and returns one outcome a member. Checked: a member's `.hydra/` files are those its
own job writes; one job a pack, in its leader's folder, with `sweep.pack`; each trial told as it
ended (COMPLETE, PRUNED, FAIL), also when the job as a whole fails or is interrupted."""

import json
import logging
import os
import shutil
from contextlib import contextmanager

import pytest
import yaml
from hydra import initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, RunMode
from omegaconf import OmegaConf
from optuna.trial import TrialState

from conftest import FAST
from dpo_sweep import names, paths
from dpo_sweep.config import register
from dpo_sweep.paths import conf_dir
from dpo_sweep.sweep import SweepError, ask_batch, prepare, run_batches, trial_overrides, write_member_folder

HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


class PackJob:
    """The task function of every job: a lone trial returns its beta; a pack's job reads its
    members' configs from their folders and returns `outcome(member config)` for each, leader
    first. Records each job's folder and overrides."""

    def __init__(self, outcome=None, before=None):
        self.outcome = outcome or (lambda m: {"trial": m.sweep.trial_number, "state": "COMPLETE", "value": m.beta,
                                              "error": None})
        self.before = before  # called with the members' configs before the outcomes: may raise
        self.jobs = []

    def __call__(self, cfg):
        hc = HydraConfig.get()
        self.jobs.append((hc.runtime.output_dir, list(hc.overrides.task)))
        if cfg.sweep.pack is None:
            return cfg.beta
        members = [cfg] + [OmegaConf.load(os.path.join(paths.hydra_dir(paths.trial_dir(hc.sweep.dir, n)),
                                                       "config.yaml")) for n in cfg.sweep.pack]
        if self.before:
            self.before(members)
        return [self.outcome(m) for m in members]


@pytest.fixture(autouse=True)
def keep_logging():
    """Hydra's launcher configures the root logger for its jobs: put it back after each test."""
    root, factory = logging.getLogger(), logging.getLogRecordFactory()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level
    logging.setLogRecordFactory(factory)


@contextmanager
def sweep(tmp_path, overrides, job):
    """The sweep `python -m dpo_sweep <overrides> -m` prepares (`Sweep`), with its Hydra sweeper."""
    register()
    overrides = [*FAST, "tracking.enabled=false", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        gh = GlobalHydra.instance()
        config = gh.hydra.compose_config("config", overrides, run_mode=RunMode.MULTIRUN)
        callbacks = Callbacks(config)
        callbacks.on_multirun_start(config=config)  # credentials masked, the sweep checked
        context = HydraContext(config_loader=gh.config_loader(), callbacks=callbacks)
        sweeper = Plugins.instance().instantiate_sweeper(config=config, hydra_context=context, task_function=job)
        sw = prepare(sweeper, OmegaConf.to_container(config.hydra.overrides.task))
        yield sweeper, sw


def hydra_files(folder):
    out = {}
    for name in HYDRA_FILES:
        with open(os.path.join(paths.hydra_dir(folder), name)) as f:
            out[name] = f.read()
    return out


def trials(sw):
    return {t.number: t for t in sw.study.get_trials(deepcopy=False)}


# ---------------------------------------------------------------------------- member folders


def test_a_member_folder_holds_what_its_own_job_writes(tmp_path):
    with sweep(tmp_path, ["model.lora.enabled=true", "beta=0.1,0.5", "hydra.sweeper.pack=2"], PackJob()) as (
            sweeper, sw):
        member = ask_batch(sw, 2)[1]
        job = trial_overrides(sw, member) + ["train.resume=true", "train.device=cuda:1"]  # resumed, pinned
        folder = write_member_folder(sweeper, sw, member.number, job)
        written = hydra_files(folder)
        shutil.rmtree(folder)
        sweeper.launcher.launch([job], initial_job_idx=member.number)  # the member's own job
        assert written == hydra_files(folder)
    assert folder == paths.trial_dir(sw.sweep_dir, member.number)  # where the pack job reads it
    cfg = yaml.safe_load(written["config.yaml"])
    assert cfg["sweep"]["trial_number"] == member.number and cfg["sweep"]["pack"] is None
    assert cfg["beta"] == 0.5 and cfg["train"]["resume"] is True and cfg["train"]["device"] == "cuda:1"
    hydra = yaml.safe_load(written["hydra.yaml"])["hydra"]
    assert hydra["runtime"]["output_dir"] == folder and hydra["job"]["num"] == member.number


def test_a_member_folder_holds_no_password(tmp_path):
    with sweep(tmp_path, ["model.lora.enabled=true", "beta=0.1,0.5", "hydra.sweeper.pack=2"], PackJob()) as (
            sweeper, sw):
        member = ask_batch(sw, 2)[1]
        job = trial_overrides(sw, member) + ["tracking.uri=postgresql://me:s3cret@db.example/mlflow"]
        written = hydra_files(write_member_folder(sweeper, sw, member.number, job))
    assert all("s3cret" not in text for text in written.values())
    assert "postgresql://me:***@db.example/mlflow" in written["config.yaml"]


# ---------------------------------------------------------------------------- packed sweeps


def test_packs_run_as_one_job_each_and_every_trial_is_told(tmp_path):
    job, lines = PackJob(), []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("dpo_sweep.sweep.packs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with sweep(tmp_path, ["model.lora.enabled=true", "beta=0.1,0.3,0.5", "train.batch_size=4,8",
                              "hydra.sweeper.pack=4"], job) as (sweeper, sw):
            run_batches(sweeper, sw)
    finally:
        logger.removeHandler(handler)
    told = trials(sw)
    params = {n: (t.params["beta"], t.params["train.batch_size"]) for n, t in told.items()}
    assert params == {0: (0.1, 4), 1: (0.1, 8), 2: (0.3, 4), 3: (0.3, 8), 4: (0.5, 4), 5: (0.5, 8)}
    assert {n: (t.state, t.values) for n, t in told.items()} == {
        n: (TrialState.COMPLETE, [beta]) for n, (beta, _) in params.items()}
    # batch 1: two packs (one a batch size), each one job in its leader's folder; batch 2: two lone trials
    assert [(os.path.basename(folder), [o for o in overrides if o.startswith("sweep.pack")])
            for folder, overrides in job.jobs] == [("0", ["sweep.pack=[2]"]), ("1", ["sweep.pack=[3]"]),
                                                   ("4", []), ("5", [])]
    assert [line for line in lines if "packed" in line or "alone" in line] == [
        "trials 0,2 packed in one process over one base model (beta differs)",
        "trials 1,3 packed in one process over one base model (beta differs)",
        "trial 4 runs alone: no other trial of this batch shares its train.batch_size=4",
        "trial 5 runs alone: no other trial of this batch shares its train.batch_size=8"]
    for n in (2, 3):
        saved = OmegaConf.load(os.path.join(paths.hydra_dir(paths.trial_dir(sw.sweep_dir, n)), "overrides.yaml"))
        assert f"sweep.trial_number={n}" in saved and not any(o.startswith("sweep.pack") for o in saved)


def test_each_member_is_told_its_own_outcome(tmp_path):
    outcomes = {0.1: ("COMPLETE", 0.7, None), 0.3: ("PRUNED", None, "pruned at step 4"),
                0.5: ("FAIL", None, "RuntimeError: loss is nan")}

    def outcome(m):
        state, value, error = outcomes[m.beta]
        return {"trial": m.sweep.trial_number, "state": state, "value": value, "error": error}

    with sweep(tmp_path, ["model.lora.enabled=true", "beta=0.1,0.3,0.5", "hydra.sweeper.pack=3"],
               PackJob(outcome)) as (sweeper, sw):
        run_batches(sweeper, sw)
    told = trials(sw)
    assert [(told[n].params["beta"], told[n].state) for n in range(3)] == [
        (0.1, TrialState.COMPLETE), (0.3, TrialState.PRUNED), (0.5, TrialState.FAIL)]
    assert told[0].values == [0.7]
    assert told[2].user_attrs[names.ERROR] == "TrialFailed: RuntimeError: loss is nan"


def test_a_pack_job_that_fails_fails_the_members_that_did_not_finish(tmp_path):
    def crash(members):  # the member with beta 0.3 finished and wrote its metrics.json
        finished = next(m for m in members if m.beta == 0.3)
        with open(paths.metrics_file(paths.trial_dir(HydraConfig.get().sweep.dir, finished.sweep.trial_number)),
                  "w") as f:
            json.dump({"objective": 0.9}, f)
        raise RuntimeError("CUDA out of memory")

    with sweep(tmp_path, ["model.lora.enabled=true", "beta=0.1,0.3,0.5", "hydra.sweeper.pack=3",
                          "hydra.sweeper.max_failure_rate=1"], PackJob(before=crash)) as (sweeper, sw):
        run_batches(sweeper, sw)
    told = trials(sw)
    assert [(told[n].params["beta"], told[n].state) for n in range(3)] == [
        (0.1, TrialState.FAIL), (0.3, TrialState.COMPLETE), (0.5, TrialState.FAIL)]
    assert told[1].values == [0.9]
    assert "RuntimeError: CUDA out of memory" in told[2].user_attrs[names.ERROR]


def test_too_many_failed_members_stop_the_sweep(tmp_path):
    fail = PackJob(lambda m: {"trial": m.sweep.trial_number, "state": "FAIL", "value": None, "error": "bad"})
    with sweep(tmp_path, ["model.lora.enabled=true", "beta=0.1,0.3,0.5,0.7", "hydra.sweeper.pack=2",
                          "hydra.sweeper.max_failure_rate=0.25"], fail) as (sweeper, sw):
        with pytest.raises(SweepError, match="2 of 4 trials failed"):
            run_batches(sweeper, sw)
    assert sorted(trials(sw)) == [0, 1]  # stopped after the first pack


def test_ctrl_c_in_a_pack_interrupts_every_member(tmp_path):
    def interrupt(members):
        raise KeyboardInterrupt

    with sweep(tmp_path, ["model.lora.enabled=true", "beta=0.1,0.3", "hydra.sweeper.pack=2"],
               PackJob(before=interrupt)) as (sweeper, sw):
        with pytest.raises(KeyboardInterrupt):
            run_batches(sweeper, sw)
    told = trials(sw)
    assert [(t.state, t.user_attrs.get(names.INTERRUPTED)) for t in told.values()] == [(TrialState.FAIL, True)] * 2
