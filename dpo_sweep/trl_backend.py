"""TRL's DPOTrainer as a second backend: `python -m dpo_sweep trainer=trl [overrides]`.

The same composed config trains through TRL 1.16's DPOTrainer instead of our Trainer, for
cross-checks and benchmarks. Everything that decides the numbers comes from our own code, so the
two backends start from the same place:
- data: our loader, validation and tokenisation (`dpo_sweep.data`); TRL receives the tokenised
  pairs as `prompt_ids`/`chosen_ids`/`rejected_ids` columns and does not re-tokenise them;
- order: the train rows are laid out in the order our Trainer visits them (same seed, shuffle,
  length grouping, epochs) and read in our micro-batches, eval rows in our eval batch order;
- model and optimizer: our `models.load_policy` and `trainer.build_optimizer`;
- metrics: TRL's per-step log is renamed to ours (`train/loss`, `train/rewards/chosen`, ...,
  `eval/...`) and sent to the same MLflow run; `fit()` returns the dict run_trial writes to
  metrics.json.

Quiet by default, as our Trainer: one progress bar (none with train.progress=false), no log
lines or warnings from TRL, transformers, accelerate and datasets; DPO_SWEEP_TRL_VERBOSE=1 in the
environment shows them all (`quiet`).

Settings TRL 1.16 cannot honour raise ConfigError naming the key (`trl_config.check_config`).
TRL is imported only by this module and `dpo_sweep.trl_config`, and only when `trainer=trl`:
`pip install 'dpo-sweep[trl]'`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig
from transformers import ProgressCallback, TrainerCallback

from dpo_sweep import models
from dpo_sweep.gen_eval import build_gen_eval
from dpo_sweep.logprobs import decide_prompt_sharing
from dpo_sweep.setup import prepare_run
from dpo_sweep.sft import sft_stage
from dpo_sweep.steps import steps_per_epoch
from dpo_sweep.trl_config import check_config, dpo_args, import_trl
from dpo_sweep.trl_data import TOKEN_COLUMNS, consecutive, eval_order, to_dataset, total_steps, train_batches
from dpo_sweep.trainer import EvalCallback, build_optimizer

log = logging.getLogger(__name__)

# Per-pair metrics TRL logs under the names we use (we add the train/ or eval/ prefix).
SHARED_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                  "logps/chosen", "logps/rejected")


# The libraries under the TRL backend whose log lines and warnings `quiet` holds back.
LIBRARIES = ("trl", "transformers", "accelerate", "datasets")
VERBOSE_ENV = "DPO_SWEEP_TRL_VERBOSE"  # =1: TRL's own logs, warnings and progress bars


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def quiet():
    """While inside: warnings and log records under WARNING... from LIBRARIES dropped (errors
    still shown), `datasets` progress bars off; all restored after. Nothing changes when verbose."""
    if verbose():
        yield
        return
    import datasets

    loggers = [logging.getLogger(name) for name in LIBRARIES]
    levels = [lg.level for lg in loggers]
    bars_on = datasets.is_progress_bar_enabled()
    with warnings.catch_warnings():
        for name in LIBRARIES:
            warnings.filterwarnings("ignore", module=rf"{name}(\.|$)")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        datasets.disable_progress_bars()
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
            if bars_on:
                datasets.enable_progress_bars()


class TrainingBar(ProgressCallback):
    """transformers' progress bar for training alone: no bar for each eval, no log dicts printed."""

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass

    def on_evaluate(self, args, state, control, **kwargs):
        pass

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


# ---------------------------------------------------------------------------- TRL objects


@functools.lru_cache(maxsize=1)
def pretokenised_trainer_class():
    """DPOTrainer that takes already tokenised pairs as they are, in our batches.

    TRL 1.16 re-tokenises every dataset from text in `_prepare_dataset` (prompt + completion as
    one string, its own EOS, no prompt truncation); skipping that for rows that already hold
    token ids keeps our tokenisation, truncation and chat-template handling. Its train loader
    cuts the rows into equal batches; given `batch_rows` (row numbers of each micro-batch) it
    yields those instead, so a partial batch sits where ours does. Eval metrics are weighted by
    batch size (`_weight_eval_batches`).
    """
    import_trl()
    from torch.utils.data import DataLoader
    from trl import DPOTrainer

    class PretokenisedDPOTrainer(DPOTrainer):
        def __init__(self, *args, batch_rows: Optional[List[List[int]]] = None, **kwargs):
            self.batch_rows = batch_rows
            super().__init__(*args, **kwargs)

        def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
            """TRL's, without its progress bar unless verbose (its tqdm reads TQDM_DISABLE)."""
            if verbose():
                return super()._precompute_ref_logps(dataset, name, batch_size)
            before = os.environ.get("TQDM_DISABLE")
            os.environ["TQDM_DISABLE"] = "1"
            try:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                if before is None:
                    del os.environ["TQDM_DISABLE"]
                else:
                    os.environ["TQDM_DISABLE"] = before

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if set(TOKEN_COLUMNS) <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
            if not self.model.training and self.eval_dataset is not None:
                self._weight_eval_batches()
            super().log(logs, start_time)

        def _weight_eval_batches(self) -> None:
            """TRL logs the plain mean of per-batch means; weight each batch by its pairs, so that
            eval metrics are means over pairs, as ours (they differ when the last batch is short)."""
            n, size = len(self.eval_dataset), self.args.per_device_eval_batch_size
            sizes = [size] * (n // size) + ([n % size] if n % size else [])
            for values in self._metrics["eval"].values():
                if len(values) == len(sizes):  # one mean per eval batch
                    values[:] = [sum(v * k for v, k in zip(values, sizes)) / n]

        def get_train_dataloader(self) -> DataLoader:
            if self.batch_rows is None:
                return super().get_train_dataloader()
            dataset = self._remove_unused_columns(self.train_dataset, description="training")
            loader = DataLoader(dataset, batch_sampler=self.batch_rows, collate_fn=self.data_collator,
                                num_workers=self.args.dataloader_num_workers,
                                pin_memory=self.args.dataloader_pin_memory)
            return self.accelerator.prepare(loader)

    return PretokenisedDPOTrainer


class MetricsBridge(TrainerCallback):
    """Renames TRL's logs to ours, sends them to the tracker, runs eval on our schedule.

    Train logs: train/{loss, rewards/*, logps/*, grad_norm, lr, epoch} at every step (kept in
    `history`, sent to the tracker every train.log_every steps and at the last). Eval: every
    train.eval_every steps before the last (0: none), and once at the end by `TRLRun.fit`; each
    goes to the tracker and to the on_eval callbacks, which may raise to stop the run.
    """

    def __init__(self, cfg: DictConfig, steps: int, steps_per_epoch: int,
                 log_metrics: Callable[[Dict[str, float], int], None], on_eval: Sequence[EvalCallback]):
        self.t, self.steps, self.steps_per_epoch = cfg.train, steps, steps_per_epoch
        self.log_metrics, self.on_eval = log_metrics, list(on_eval)
        self.history: List[Dict[str, float]] = []
        self.last_eval: Dict[str, float] = {}
        self.gen_eval, self.policy = None, None  # set by build_trainer when eval.gen is on

    def on_step_end(self, args, state, control, **kwargs):
        every = self.t.eval_every
        if every and state.global_step % every == 0 and state.global_step < self.steps:
            control.should_evaluate = True
        return control

    def on_log(self, args, state, control, logs=None, lr_scheduler=None, **kwargs):
        if not logs or "loss" not in logs or "rewards/chosen" not in logs:
            return  # an eval log or the end-of-training summary
        step = state.global_step
        metrics = {f"train/{k}": float(logs[k]) for k in SHARED_METRICS}
        metrics["train/grad_norm"] = float(logs["grad_norm"])
        # As our Trainer logs it: the lr after this step's scheduler update (TRL logs the one it used).
        metrics["train/lr"] = float(lr_scheduler.get_last_lr()[0])
        metrics["train/epoch"] = (step - 1) // self.steps_per_epoch + 1
        self.history.append(metrics)
        if step % self.t.log_every == 0 or step == self.steps:
            self.log_metrics(metrics, step)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.last_eval = {f"eval/{k}": float(metrics[f"eval_{k}"]) for k in SHARED_METRICS}
        if self.gen_eval is not None:
            self.last_eval.update(self.gen_eval.evaluate(self.policy))
        self.log_metrics(self.last_eval, state.global_step)
        for callback in self.on_eval:
            callback(state.global_step, self.last_eval)


class TRLRun:
    """A DPOTrainer set up from our config, with our Trainer's surface: `fit()` returns metrics
    named as ours; `history`, `total_steps`, `policy`, and `on_eval` (a list callers may extend,
    e.g. with a sweep's pruning callback)."""

    def __init__(self, trainer, policy, bridge: MetricsBridge):
        self.trainer, self.policy, self.bridge = trainer, policy, bridge
        self.total_steps = bridge.steps
        self.on_eval = bridge.on_eval  # the same list: callbacks added here run at every eval
        self.gen_eval = bridge.gen_eval

    @property
    def history(self) -> List[Dict[str, float]]:
        """Train metrics of every optimizer step, one dict a step (as Trainer.history)."""
        return self.bridge.history

    def fit(self) -> Dict[str, float]:
        """Train, then eval once; return the last train metrics and the final eval metrics."""
        with quiet():
            self.trainer.train()
            self.trainer.evaluate()
        log.info("final eval: %s", ", ".join(f"{k}={v:.4f}" for k, v in self.bridge.last_eval.items()))
        return {**self.history[-1], **self.bridge.last_eval}


def build_trainer(cfg: DictConfig, out_dir: str, tracker=None,
                  on_eval: Sequence[EvalCallback] = ()) -> Tuple[TRLRun, Any]:
    """Tokenizer, data (checked before any model loads), policy, reference, and TRL's trainer.

    Mirrors dpo_sweep.run.build_trainer; TRL's own files (none are saved) would go to
    `<out_dir>/trl`. TRL caches precomputed reference log-probs itself.
    """
    with quiet():
        return _build_trainer(cfg, out_dir, tracker, on_eval)


def _build_trainer(cfg: DictConfig, out_dir: str, tracker, on_eval: Sequence[EvalCallback]) -> Tuple[TRLRun, Any]:
    check_config(cfg)
    import_trl()
    from transformers import PrinterCallback

    run = prepare_run(cfg, tracker)
    data = run.data
    steps = total_steps(cfg, len(data.train))
    per_epoch = steps_per_epoch(len(data.train), cfg.train.batch_size, cfg.train.grad_accum)
    warmup = cfg.train.warmup_steps or int(cfg.train.warmup_ratio * steps)
    sharing = decide_prompt_sharing(None, cfg.train.share_prompt)  # TRL takes two rows a pair; grouping as ours
    batches = train_batches(data.train, cfg, steps, sharing)
    train_set = to_dataset(data.train, [i for idx in batches for i in idx])
    eval_set = to_dataset(data.eval, eval_order(data.eval, cfg.train, sharing))

    policy = models.load_policy(cfg.model, run.tokenizer, cfg.seed, sft_stage(cfg, run, None)).to(run.device)
    # TRL would reload the reference from the policy's hub name, which a model built from
    # model.config does not have: hand it our frozen copy. None: precomputed (TRL uses the policy
    # before its first step, then drops it), or LoRA (TRL scores the reference with a frozen copy
    # of the fresh adapter, which is the base model, as our AdapterOffReference).
    copy = cfg.train.reference == "copy" and not models.is_lora(policy)
    ref_model = models.make_reference(policy) if copy else None
    models.configure_training(policy, cfg.train.gradient_checkpointing, cfg.train.compile)
    log_metrics = tracker.log_metrics if tracker else (lambda m, s: None)
    bridge = MetricsBridge(cfg, steps, per_epoch, log_metrics, on_eval)
    bridge.gen_eval, bridge.policy = build_gen_eval(cfg, policy, run, None, ref_model), policy
    trainer = pretokenised_trainer_class()(
        model=policy,
        ref_model=ref_model,
        args=dpo_args(cfg, os.path.join(out_dir, "trl"), run, steps, warmup),
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=run.tokenizer,
        callbacks=[bridge],
        optimizers=(build_optimizer(policy, cfg.optimizer), None),  # ours: no decay on 1-d weights
        batch_rows=consecutive(batches),
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    if trainer.pop_callback(ProgressCallback) is not None and not verbose():  # train.progress: one bar
        trainer.add_callback(TrainingBar)
    elif verbose():
        trainer.add_callback(ProgressCallback)
    return TRLRun(trainer, policy, bridge), run.tokenizer
