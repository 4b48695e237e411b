"""The packed loop: K trials (lanes) train in one process over one frozen base model, each with
its own LoRA adapter, beta, loss, optimizer, schedule, history, evals, pruning and failure.

Lanes at the same optimizer step see the same micro-batches (a pure function of the step, the
data and the shared settings: `steps.epoch_order`), so each micro-batch is collated once for all
of them, K times over, and goes through the model in one forward: the frozen weights are read
once for K trials, and each block of rows through its own adapter (`lora.Router`). Every lane's
loss depends on its own rows and adapter only; their sum is backpropagated once, and each lane's
optimizer steps on its own adapter's gradients: gradients never mix.

A lane that fails (a non-finite loss or gradient, an error in its evals or callbacks) or is
pruned leaves the pack; the others go on. Lanes resumed from checkpoints of different steps
train the ones behind first, until all are at the same step again.

B pairs per micro-batch, G lanes in a forward; rows of the packed batch: G blocks of 2B (two rows
a pair, chosen first) or of B (the shared-prompt layout).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, ContextManager, Dict, List, Sequence

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from dpo_sweep import checkpoint, paths, tracking
from dpo_sweep.batching import collate, collate_shared
from dpo_sweep.logprobs import PromptSharing, batch_logps
from dpo_sweep.packing.lanes import Lane, LaneLogps, OncePerBatch
from dpo_sweep.packing.lora import Router, lane_parameters
from dpo_sweep.pairs import Pair
from dpo_sweep.steps import epoch_order, eval_batches, lr_factor, steps_per_epoch
from dpo_sweep.trainer import DPOObjective, EvalCallback, TrainingError, TrialStopped, _mean, optimizer_for

log = logging.getLogger(__name__)
Tensor = torch.Tensor


class PackedTrainer:
    def __init__(self, cfg: DictConfig, policy, router: Router, reference, train_pairs: List[Pair],
                 eval_pairs: List[Pair], pad_id: int, device: torch.device,
                 autocast: Callable[[], ContextManager], sharing: PromptSharing, per_forward: int = 0):
        """`cfg`: any lane's config (they share every setting used here: train.*, seed, data).
        `per_forward`: lanes that go through the model together (0: all of them)."""
        self.cfg, self.t = cfg, cfg.train
        self.per_forward = per_forward
        self.policy, self.router = policy, router
        self.reference = OncePerBatch(reference)
        self.train_pairs, self.eval_pairs = train_pairs, eval_pairs
        self.pad_id, self.device, self.autocast, self.sharing = pad_id, device, autocast, sharing
        self.steps_per_epoch = steps_per_epoch(len(train_pairs), self.t.batch_size, self.t.grad_accum)
        self.total_steps = self.t.max_steps if self.t.max_steps > 0 else self.t.epochs * self.steps_per_epoch
        self.warmup = self.t.warmup_steps or int(self.t.warmup_ratio * self.total_steps)
        if self.t.warmup_steps > self.total_steps:
            from dpo_sweep.config import ConfigError

            raise ConfigError(f"config key 'train.warmup_steps' = {self.t.warmup_steps}: expected at most the run's "
                              f"{self.total_steps} optimizer steps ({len(train_pairs)} train pairs)")
        self.lanes: List[Lane] = []
        self._epochs: Dict[int, List[List[int]]] = {}

    def add_lane(self, cfg: DictConfig, name: str, label: str, log_metrics, on_eval: Sequence[EvalCallback] = (),
                 gen_eval=None) -> Lane:
        """A lane training adapter `name` as `cfg` says: its loss, beta, optimizer and schedule."""
        params = lane_parameters(self.policy, [name])
        optimizer = optimizer_for(params, cfg.optimizer)
        schedule, warmup, total = self.t.lr_schedule, self.warmup, self.total_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, schedule, warmup, total))
        objective = DPOObjective(cfg.beta, cfg.loss.name, cfg.loss.label_smoothing, cfg.loss.length_normalize)
        lane = Lane(cfg, name, label, objective, params, optimizer, scheduler, log_metrics, list(on_eval), gen_eval)
        self.lanes.append(lane)
        return lane

    # -- a lane's errors stay its own

    @contextlib.contextmanager
    def own(self, lane: Lane):
        """Inside it, an error (or a pruning) ends `lane` alone; Ctrl-C still ends the pack."""
        try:
            yield
        except Exception as e:
            lane.error = e
            for p in lane.params:
                p.grad = None
            others = sum(other.running for other in self.lanes)
            if isinstance(e, TrialStopped):
                log.info("%s leaves the pack at step %d: %s; %d trials go on", lane.label, lane.step, e, others)
            else:
                log.error("%s failed at step %d: %s: %s; %d trials of the pack go on", lane.label, lane.step,
                          type(e).__name__, e, others, exc_info=not isinstance(e, TrainingError))

    # -- batches

    def _to_device(self, batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def step_batches(self, step: int) -> List[List[int]]:
        """The micro-batches (pair indices) of optimizer step `step` (0-based), as `Trainer` has them."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch not in self._epochs:
            self._epochs = {epoch: epoch_order(self.train_pairs, self.t, self.cfg.seed, epoch, self.steps_per_epoch,
                                               self.sharing)}
        ga = self.t.grad_accum
        return self._epochs[epoch][within * ga : (within + 1) * ga]

    def forward(self, lanes: Sequence[Lane], pairs: Sequence[Pair]) -> List[LaneLogps]:
        """The lanes' log-probs of the same pairs, in one forward of the packed batch."""
        G, B = len(lanes), len(pairs)
        with self.router.route([lane.name for lane in lanes]):
            if self.sharing.layout:  # B rows per lane; logps (2GB,): every chosen, then every rejected
                logps, counts = batch_logps(self.policy, self._to_device(collate_shared(list(pairs) * G, self.pad_id)))
                return [(torch.cat([logps[j * B : (j + 1) * B], logps[(G + j) * B : (G + j + 1) * B]]),
                         torch.cat([counts[j * B : (j + 1) * B], counts[(G + j) * B : (G + j + 1) * B]]))
                        for j in range(G)]
            one = self._to_device(collate(pairs, self.pad_id))  # (2B, T) each
            logps, counts = batch_logps(self.policy, {k: v.repeat(G, *[1] * (v.dim() - 1)) for k, v in one.items()})
            R = 2 * B  # rows of a lane: G blocks of the same 2B rows
            return [(logps[j * R : (j + 1) * R], counts[j * R : (j + 1) * R]) for j in range(G)]

    def together(self, lanes: Sequence[Lane]) -> List[List[Lane]]:
        """The lanes in the groups that go through the model together (`per_forward` at most)."""
        n = self.per_forward or len(lanes) or 1
        return [list(lanes[i : i + n]) for i in range(0, len(lanes), n)]

    def _losses(self, lanes: Sequence[Lane], idx: Sequence[int], pairs: Sequence[Pair], split: str):
        """Each running lane's per-pair losses and metrics on one micro-batch."""
        batch = self._to_device(collate(pairs, self.pad_id))  # one lane's batch: what the reference reads
        out = []
        for lane, logps in zip(lanes, self.forward(lanes, pairs)):
            with self.own(lane):
                losses, metrics = lane.objective(lambda _, logps=logps: logps, self.reference, batch, split, idx)
                out.append((lane, losses, metrics))
        return out

    # -- one optimizer step of a group of lanes at the same step

    def train_step(self, group: Sequence[Lane], micro: Sequence[Sequence[int]]) -> None:
        self.policy.train()
        n_pairs = sum(len(idx) for idx in micro)
        per_pair: Dict[str, List[Dict[str, Tensor]]] = {lane.name: [] for lane in group}
        for idx in micro:
            live = [lane for lane in group if lane.running]
            if not live:
                return
            for lanes in self.together(live):
                self._backward(lanes, idx, n_pairs, per_pair)
        for lane in group:
            if lane.running:
                with self.own(lane):
                    self._step(lane, per_pair[lane.name])

    def _backward(self, lanes: Sequence[Lane], idx: Sequence[int], n_pairs: int,
                  per_pair: Dict[str, List[Dict[str, Tensor]]]) -> None:
        """One forward of `lanes` on the micro-batch `idx`, their summed losses backpropagated once."""
        total = None
        with self.autocast():
            for lane, losses, metrics in self._losses(lanes, idx, [self.train_pairs[i] for i in idx], "train"):
                with self.own(lane):
                    loss = losses.sum() / n_pairs
                    if not torch.isfinite(loss):
                        raise TrainingError(f"non-finite loss ({loss.item()}) at step {lane.step + 1}; lower "
                                            f"optimizer.lr (= {lane.cfg.optimizer.lr}) or check the data")
                    total = loss if total is None else total + loss  # each lane's own rows and adapter
                    per_pair[lane.name].append(dict(metrics, loss=losses.detach()))
            if total is not None:
                total.backward()

    def _step(self, lane: Lane, per_pair: List[Dict[str, Tensor]]) -> None:
        max_norm = self.t.max_grad_norm if self.t.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_([p for p in lane.params if p.grad is not None], max_norm).item()
        if not torch.isfinite(torch.tensor(norm)):
            raise TrainingError(f"non-finite gradient norm at step {lane.step + 1}; lower optimizer.lr "
                                f"(= {lane.cfg.optimizer.lr}) or check the data")
        lane.optimizer.step()
        lane.scheduler.step()
        lane.optimizer.zero_grad(set_to_none=True)
        lane.step += 1
        out = {f"train/{k}": v for k, v in _mean(per_pair, self.device, across_ranks=False).items()}
        out["train/grad_norm"] = norm
        out["train/lr"] = lane.scheduler.get_last_lr()[0]
        out["train/epoch"] = (lane.step - 1) // self.steps_per_epoch + 1
        lane.history.append(out)
        if lane.step % self.t.log_every == 0 or lane.step == self.total_steps:
            lane.log_metrics(out, lane.step)

    # -- eval

    @torch.no_grad()
    def evaluate(self, lanes: Sequence[Lane]) -> Dict[str, Dict[str, float]]:
        """Each lane's eval metrics (pairwise, then generated answers), by adapter name."""
        self.policy.eval()
        per_pair: Dict[str, List[Dict[str, Tensor]]] = {lane.name: [] for lane in lanes}
        for idx in eval_batches(self.eval_pairs, self.t, self.sharing):
            for live in self.together([lane for lane in lanes if lane.running]):
                with self.autocast():
                    for lane, losses, metrics in self._losses(live, idx, [self.eval_pairs[i] for i in idx], "eval"):
                        per_pair[lane.name].append(dict(metrics, loss=losses))
        answers = {}
        for sampling in self.together([lane for lane in lanes if lane.running and lane.gen_eval is not None]):
            answers.update(self._sample(sampling))
        out = {}
        for lane in lanes:
            if not lane.running:
                continue
            with self.own(lane):
                metrics = {f"eval/{k}": v for k, v in _mean(per_pair[lane.name], self.device, across_ranks=False).items()}
                if lane.gen_eval is not None:
                    with self.router.route([lane.name]):
                        metrics.update(lane.gen_eval.evaluate(self.policy, answers.get(lane.name)))
                out[lane.name] = metrics
        self.policy.train()
        return out

    def _sample(self, lanes: Sequence[Lane]) -> Dict[str, List[List[int]]]:
        """The lanes' answers to the eval prompts, sampled together: one batched generate, each
        lane's block of rows through its adapter (its answers are those it samples alone)."""
        if not lanes:
            return {}
        with self.router.route([lane.name for lane in lanes]):
            answers = lanes[0].gen_eval.sample_groups(self.policy, len(lanes))
        return {lane.name: a for lane, a in zip(lanes, answers)}

    def eval_and_report(self, lanes: Sequence[Lane]) -> None:
        """Evaluate, log, and hand each lane's metrics to its callbacks (its pruner may stop it)."""
        results = self.evaluate(lanes)
        for lane in lanes:
            if lane.running:
                with self.own(lane):
                    metrics = results[lane.name]
                    lane.log_metrics(metrics, lane.step)
                    for callback in lane.on_eval:
                        callback(lane.step, metrics)
                    if lane.step >= self.total_steps:
                        lane.metrics = {**(lane.history[-1] if lane.history else {}), **metrics}
                        lane.finished = True

    # -- checkpoints

    def save_checkpoint(self, lane: Lane, path: str) -> None:
        """As `Trainer.save_checkpoint`, for one lane: a lone run of its config resumes from it."""
        checkpoint.save(path, lane.step, lane.view(self.policy), lane.optimizer, lane.scheduler, lane.history,
                        settings=tracking.flatten(lane.cfg))

    def load_checkpoint(self, lane: Lane, path: str, verified: bool = False) -> None:
        lane.step, lane.history = checkpoint.load(path, lane.view(self.policy), lane.optimizer, lane.scheduler,
                                                  verified)
        log.info("%s resumed from %s at step %d", lane.label, path, lane.step)

    def _maybe_checkpoint(self, lane: Lane) -> None:
        every = self.t.checkpoint_every
        if lane.checkpoint_dir and every and lane.step % every == 0 and lane.step < self.total_steps:
            self.save_checkpoint(lane, os.path.join(lane.checkpoint_dir, paths.CHECKPOINT_FILE))

    # -- the loop

    def fit(self) -> None:
        """Train every lane for total_steps, then its final eval; each ends in `metrics` (finished)
        or `error`."""
        bar = tqdm(total=self.total_steps * len(self.lanes), initial=sum(lane.step for lane in self.lanes),
                   desc=f"DPO x{len(self.lanes)}", disable=not self.t.progress, dynamic_ncols=True)
        while True:
            behind = [lane for lane in self.lanes if lane.running and lane.step < self.total_steps]
            if not behind:
                break
            step = min(lane.step for lane in behind)
            group = [lane for lane in behind if lane.step == step]  # the others wait for them
            self.train_step(group, self.step_batches(step))
            bar.update(len(group))
            done = [lane for lane in group if lane.running]
            if done:
                bar.set_postfix(loss=" ".join(f"{lane.history[-1]['train/loss']:.3f}" for lane in done))
            every = self.t.eval_every
            due = [lane for lane in done if every and lane.step % every == 0 and lane.step < self.total_steps]
            if due:
                self.eval_and_report(due)
            for lane in done:
                if lane.running:
                    with self.own(lane):
                        self._maybe_checkpoint(lane)
        bar.close()
        final = [lane for lane in self.lanes if lane.running]
        if final:
            self.eval_and_report(final)
        for lane in self.lanes:
            if lane.finished:
                log.info("%s final eval: %s", lane.label,
                         ", ".join(f"{k}={v:.4f}" for k, v in lane.metrics.items() if k.startswith("eval/")))
