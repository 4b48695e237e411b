"""A pack job: several LoRA trials of a sweep trained in one process over one frozen base model.

The sweeper launches a pack as one Hydra job in its first trial's folder, with `sweep.pack`
naming the other trials; their configs wait in their own folders (`.hydra/config.yaml`, written by
the sweeper as Hydra writes a lone trial's). Each trial keeps what a lone trial has: its MLflow
run under the sweep's parent, its metrics.json, checkpoints, samples and saved model in its own
folder, its reports to the study (its pruning), its own failure. The job returns one outcome per
trial, leader first: {"trial", "state": COMPLETE | PRUNED | FAIL, "value", "error"}.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from dpo_sweep import cache_files, models, names, paths, tracking
from dpo_sweep.config import validate
from dpo_sweep.gen_eval import build_gen_eval
from dpo_sweep.logprobs import apply_prompt_sharing, decide_prompt_sharing
from dpo_sweep.packing.lora import add_lanes, lane_name, save_lane
from dpo_sweep.packing.plan import check_pack
from dpo_sweep.packing.trainer import Lane, PackedTrainer
from dpo_sweep.setup import log_data, prepare_run
from dpo_sweep.sft import sft_stage
from dpo_sweep.trainer import TrialStopped

log = logging.getLogger(__name__)
Outcome = Dict[str, Any]


def member_configs(cfg: DictConfig, sweep_dir: str) -> List[DictConfig]:
    """The pack's configs, leader first: the job's own (without `sweep.pack`, as it runs alone)
    and each member's, read from its folder onto the schema."""
    from dpo_sweep.schema import DPOSweepConfig

    leader = copy.deepcopy(cfg)
    leader.sweep.pack, leader.sweep.pack_forward = None, None
    cfgs = [leader]
    for number in cfg.sweep.pack:
        path = os.path.join(paths.hydra_dir(paths.trial_dir(sweep_dir, number)), "config.yaml")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"trial {number} of the pack has no config at {path}: the sweeper writes it "
                                    f"before the pack starts")
        cfgs.append(OmegaConf.merge(OmegaConf.structured(DPOSweepConfig), OmegaConf.load(path)))
    return cfgs


def run_pack_job(cfg: DictConfig) -> List[Outcome]:
    """The Hydra job of a pack (`sweep.pack` set): every member trained, one outcome each."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    sweep_dir = str(hc.sweep.dir)
    cfgs = member_configs(cfg, sweep_dir)
    out_dirs = [hc.runtime.output_dir] + [paths.trial_dir(sweep_dir, n) for n in cfg.sweep.pack]
    with member_logs(out_dirs[1:]):
        return run_pack(cfgs, out_dirs, hc.runtime.cwd, per_forward=cfg.sweep.pack_forward)


@contextlib.contextmanager
def member_logs(folders: Sequence[str]) -> Iterator[None]:
    """The pack's log also in each other member's folder, in the file Hydra gives a job's log
    (its leader's job log file, by name and format): every trial folder has its log."""
    root = logging.getLogger()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    added = []
    for folder in folders if files else []:
        handler = logging.FileHandler(os.path.join(folder, os.path.basename(files[0].baseFilename)))
        handler.setFormatter(files[0].formatter)
        handler.setLevel(files[0].level)
        root.addHandler(handler)
        added.append(handler)
    try:
        yield
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()


def run_pack(cfgs: Sequence[DictConfig], out_dirs: Sequence[str], cwd: Optional[str] = None,
             per_forward: Optional[int] = None) -> List[Outcome]:
    """Train the trials `cfgs` (each run folder in `out_dirs`) together; one outcome per trial.
    `per_forward` of them go through the model together (None: all on a GPU, one on a CPU). An
    error that is no single trial's (the data, the model) fails them all, and raises."""
    from dpo_sweep.run import seed_everything

    for cfg in cfgs:
        validate(cfg)
    check_pack(cfgs)
    for out_dir in out_dirs:
        os.makedirs(out_dir, exist_ok=True)
    seed_everything(cfgs[0].seed)
    pack = ",".join(str(c.sweep.trial_number) for c in cfgs if c.sweep.trial_number is not None)
    trackers = [_start_run(cfg, out_dir, cwd, pack) for cfg, out_dir in zip(cfgs, out_dirs)]
    lanes: List[Lane] = []
    crashed = True
    try:
        written = len(cache_files.WRITTEN)
        trainer, tokenizer = build_pack(cfgs, cwd, trackers, per_forward)
        lanes = trainer.lanes
        for lane, out_dir, tracker in zip(lanes, out_dirs, trackers):
            with trainer.own(lane):
                _resume(trainer, lane, out_dir, tracker)
        trainer.fit()
        built = sorted({cache_files.kind(p) for p in cache_files.WRITTEN[written:]})
        outcomes = [_finish(trainer, lane, tokenizer, out_dir, tracker, built)
                    for lane, out_dir, tracker in zip(lanes, out_dirs, trackers)]
        crashed = False
        return outcomes
    except KeyboardInterrupt:
        crashed = False  # stopped, not failed: the runs end KILLED
        raise
    finally:  # each MLflow run ends as its trial did; FAILED when the pack as a whole did
        for j, tracker in enumerate(trackers):
            if tracker:
                tracker.end("FAILED" if crashed else _status(lanes[j] if j < len(lanes) else None))


def _status(lane: Optional[Lane]) -> str:
    """The MLflow status of a lane's run: FINISHED, KILLED (pruned, or stopped by Ctrl-C) or FAILED."""
    if lane is None:
        return "KILLED"
    if lane.error is None:
        return "FINISHED" if lane.finished else "KILLED"
    return "KILLED" if isinstance(lane.error, TrialStopped) else "FAILED"


def _start_run(cfg: DictConfig, out_dir: str, cwd: Optional[str], pack: str):
    """The trial's MLflow run, tagged as a lone trial's are, and with the pack it trained in."""
    if not cfg.tracking.enabled:
        return None
    tracking.end_dead_runs(tracking.resolve_uri(cfg.tracking.uri, cwd), cfg.tracking.experiment, out_dir)
    tracker = tracking.start_run(cfg, run_name=os.path.basename(out_dir), cwd=cwd)
    tracker.set_tags({names.RUN_DIR: os.path.abspath(out_dir), names.RUN_OWNER: tracking.process_owner(),
                      names.PACK: pack})
    tracker.log_params(tracking.flatten(cfg))
    return tracker


def build_pack(cfgs: Sequence[DictConfig], cwd: Optional[str], trackers: Sequence[Any], per_forward: Optional[int] = None):
    """Data (checked before any model loads), the base model with the first trial's adapter,
    reference and generation eval as a lone run of it builds them (so the caches are shared
    with lone runs), then one adapter per further trial, and the trainer with a lane each."""
    from dpo_sweep.run import build_reference, sweep_callbacks

    cfg = cfgs[0]
    if cfg.train.fsdp or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("packed trials train in one process: not under torchrun or train.fsdp")
    run = prepare_run(cfg)
    for tracker in trackers:
        if tracker:
            log_data(tracker, cfg.dataset, run.data)
    policy = models.load_policy(cfg.model, run.tokenizer, cfg.seed, sft_stage(cfg, run, cwd)).to(run.device)
    t = cfg.train
    sharing = decide_prompt_sharing(policy, t.share_prompt, t.max_length)
    apply_prompt_sharing(policy, sharing)
    ref = build_reference(cfg, policy, run, cwd)
    gen_eval = build_gen_eval(cfg, policy, run, cwd, None)  # the reference samples: adapters off, shared
    router = add_lanes(policy, [c.model.lora for c in cfgs], cfg.seed)
    models.configure_training(policy, t.gradient_checkpointing, t.compile)
    if per_forward is None:  # a GPU gains from one forward for all; a CPU's products are compute-bound
        per_forward = 0 if run.device.type == "cuda" else 1
    trainer = PackedTrainer(cfg, policy, router, ref, run.data.train, run.data.eval, run.tokenizer.pad_token_id,
                            run.device, run.autocast, sharing, per_forward)
    for j, (c, tracker) in enumerate(zip(cfgs, trackers)):
        own_eval = copy.copy(gen_eval) if gen_eval is not None else None
        callbacks = []
        if own_eval is not None and tracker:  # each eval's samples, as a table in the MLflow UI
            callbacks.append(lambda step, _, e=own_eval, tr=tracker:
                             tr.log_table(e.last_rows, f"samples/step_{step:06d}.json"))
        callbacks += sweep_callbacks(c, trainer.total_steps)
        number = c.sweep.trial_number
        trainer.add_lane(c, lane_name(j), f"trial {number}" if number is not None else f"run {j}",
                         tracker.log_metrics if tracker else (lambda m, s: None), callbacks, own_eval)
    log.info("pack of %d trials (%s) over one %s base model: %d LoRA adapters, %d optimizer steps each, %s "
             "through the model at a time", len(cfgs), ", ".join(lane.label for lane in trainer.lanes),
             cfg.model.name_or_path or "tiny", len(cfgs), trainer.total_steps, per_forward or len(cfgs))
    return trainer, run.tokenizer


def _resume(trainer: PackedTrainer, lane: Lane, out_dir: str, tracker) -> None:
    """As a lone run resumes (run._resume): from the lane's checkpoint when train.resume."""
    from dpo_sweep.run import resume_from_folder

    lane.checkpoint_dir = paths.checkpoint_dir(out_dir)

    def load(path: str) -> List[Dict[str, float]]:
        trainer.load_checkpoint(lane, path, verified=True)
        return lane.history

    resume_from_folder(lane.cfg, out_dir, tracker, load)


def _finish(trainer: PackedTrainer, lane: Lane, tokenizer, out_dir: str, tracker, built: List[str]) -> Outcome:
    """A lane's results on disk and in MLflow, as a lone trial's (outcome.record_results); its outcome."""
    from dpo_sweep.outcome import record_results

    trial = lane.cfg.sweep.trial_number
    if lane.running:  # not finished, not failed: nothing else ends a lane
        lane.error = RuntimeError("the pack ended before this trial finished")
    if lane.error is None:
        with trainer.own(lane):
            files = [lane.gen_eval.write_samples(out_dir)] if lane.gen_eval is not None else []
            if lane.cfg.train.save_model:
                save_lane(trainer.policy, lane.name, tokenizer, paths.model_dir(out_dir), lane.cfg.model.lora.merge)
            objective = record_results(lane.cfg, out_dir, tracker, lane.metrics, lane.step, files, built)
            value = list(objective) if isinstance(objective, tuple) else objective
            return {"trial": trial, "state": "COMPLETE", "value": value, "error": None}
    if isinstance(lane.error, TrialStopped):
        return {"trial": trial, "state": "PRUNED", "value": None, "error": str(lane.error)}
    return {"trial": trial, "state": "FAIL", "value": None, "error": f"{type(lane.error).__name__}: {lane.error}"}
