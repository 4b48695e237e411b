"""The training loop: steps, accumulation, clipping, schedule, autocast, eval, and when to
checkpoint (the file's contents: `dpo_sweep.checkpoint`).

B pairs per micro-batch; each batch holds 2B sequences (chosen rows, then rejected rows) that go
through the policy in one forward pass.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from dpo_sweep import checkpoint, distributed, logprobs, paths, tracking
from dpo_sweep.config import ConfigError
from dpo_sweep.batching import collate, collate_shared
from dpo_sweep.pairs import Pair
from dpo_sweep.logprobs import PromptSharing
from dpo_sweep.losses import LOSSES, METRIC_NAMES, reward_metrics
from dpo_sweep.steps import epoch_order, eval_batches, lr_factor, steps_per_epoch

log = logging.getLogger(__name__)
Tensor = torch.Tensor
EvalCallback = Callable[[int, Dict[str, float]], None]  # (step, eval metrics); may raise to stop


class TrialStopped(Exception):
    """Raised by an `on_eval` callback to end a run early on purpose (a sweep trial that its
    pruner stopped): the run's MLflow run ends KILLED rather than FAILED."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient); the message says where."""


@dataclass
class DPOObjective:
    """What turns a batch into per-pair losses: the loss function and its settings."""

    beta: float
    loss_name: str
    label_smoothing: float
    length_normalize: bool

    def __call__(self, policy: torch.nn.Module, reference, batch: Dict[str, Tensor], split: str,
                 idx: Sequence[int]) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Per-pair losses (B,) and per-pair metrics, each (B,). `policy` is a PolicyLogps."""
        logps, counts = policy(batch)  # (2B,), (2B,): chosen first
        B = logps.shape[0] // 2
        ref_chosen, ref_rejected, ref_chosen_n, ref_rejected_n = reference.logps(batch, split, idx)
        chosen, rejected = logps[:B], logps[B:]
        ref_chosen, ref_rejected = ref_chosen.float(), ref_rejected.float()
        inputs = (chosen, rejected, ref_chosen, ref_rejected)
        if self.length_normalize:  # the loss sees per-token averages
            inputs = (chosen / counts[:B], rejected / counts[B:], ref_chosen / ref_chosen_n, ref_rejected / ref_rejected_n)
        losses, chosen_rewards, rejected_rewards = LOSSES[self.loss_name](*inputs, self.beta, self.label_smoothing)
        if self.length_normalize:  # rewards and logged log-probs stay summed, as TRL logs them
            chosen_rewards = self.beta * (chosen - ref_chosen).detach()
            rejected_rewards = self.beta * (rejected - ref_rejected).detach()
        return losses, reward_metrics(chosen_rewards, rejected_rewards, chosen, rejected)


class PolicyLogps(torch.nn.Module):
    """The policy's forward as one module, so that DDP wraps exactly what training calls."""

    def __init__(self, model: PreTrainedModel, head_only: bool = True):
        super().__init__()
        self.model, self.head_only = model, head_only

    def forward(self, batch: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        return logprobs.batch_logps(self.model, batch, self.head_only)  # (2B,), (2B,)


def build_optimizer(model: PreTrainedModel, cfg: DictConfig) -> torch.optim.Optimizer:
    """AdamW over the model's trainable weights (`optimizer_for`)."""
    return optimizer_for([p for p in model.parameters() if p.requires_grad], cfg)


def optimizer_for(params: List[torch.nn.Parameter], cfg: DictConfig) -> torch.optim.Optimizer:
    """AdamW over `params`; biases and norm weights (1-d tensors) get no weight decay."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def _mean(values: List[Dict[str, Tensor]], device: torch.device, across_ranks: bool = True) -> Dict[str, float]:
    """Average per-pair metrics over all pairs of several batches, and of every rank (a rank
    with no batch still joins the reduction, with zeros)."""
    sums: Dict[str, float] = {k: 0.0 for k in METRIC_NAMES + ("loss",)}
    for v in values:
        for k, t in v.items():
            sums[k] = sums.get(k, 0.0) + t.detach().double().sum().item()
    sums["_pairs"] = float(sum(len(v["loss"]) for v in values))
    if across_ranks:
        sums = distributed.reduce_sums(sums, device)
    n = max(sums.pop("_pairs"), 1.0)
    return {k: v / n for k, v in sums.items()}


class Trainer:
    def __init__(
        self,
        cfg: DictConfig,
        policy: PreTrainedModel,
        reference,
        train_pairs: List[Pair],
        eval_pairs: List[Pair],
        pad_id: int,
        device: torch.device,
        autocast: Callable[[], ContextManager],
        sharing: PromptSharing,
        log_metrics: Callable[[Dict[str, float], int], None] = lambda m, s: None,
        on_eval: Sequence[EvalCallback] = (),
        gen_eval=None,
    ):
        self.cfg, self.t = cfg, cfg.train
        self.policy, self.reference = policy, reference
        self.train_pairs, self.eval_pairs = train_pairs, eval_pairs
        self.pad_id, self.device, self.autocast = pad_id, device, autocast
        self.sharing = sharing  # the layout the policy takes (run.build_trainer applied it) and the grouping
        self.log_metrics, self.on_eval = log_metrics, list(on_eval)
        self.gen_eval = gen_eval  # a gen_eval.GenEvaluator: what the policy generates, at every eval
        self.objective = DPOObjective(cfg.beta, cfg.loss.name, cfg.loss.label_smoothing, cfg.loss.length_normalize)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if self.t.batch_size % self.world:
            raise ConfigError(f"config key 'train.batch_size' = {self.t.batch_size}: expected a multiple of "
                              f"the number of processes ({self.world}); it is the global batch")
        self.steps_per_epoch = steps_per_epoch(len(train_pairs), self.t.batch_size, self.t.grad_accum, self.world)
        self.total_steps = self.t.max_steps if self.t.max_steps > 0 else self.t.epochs * self.steps_per_epoch
        warmup = self.t.warmup_steps or int(self.t.warmup_ratio * self.total_steps)
        if self.t.warmup_steps > self.total_steps:  # known only now for local and hub data
            raise ConfigError(f"config key 'train.warmup_steps' = {self.t.warmup_steps}: expected at most the run's "
                              f"{self.total_steps} optimizer steps ({len(train_pairs)} train pairs)")
        self.optimizer = build_optimizer(policy, cfg.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.t.lr_schedule, warmup, self.total_steps)
        )
        self.collate = collate_shared if sharing.layout else collate
        self.logps = PolicyLogps(policy, head_only=not self.t.fsdp)  # eval, and training in one process
        self.train_logps = self.logps
        if self.world > 1 and not self.t.fsdp:  # FSDP (sharded by build_trainer) reduces on its own
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.train_logps = DistributedDataParallel(self.logps, device_ids=ids)
        self.step = 0
        self.history: List[Dict[str, float]] = []  # logged train metrics, one dict a step
        self.checkpoint_dir: Optional[str] = None  # set to write train.checkpoint_every checkpoints

    # -- batches

    def _to_device(self, batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def epoch_batches(self, epoch: int) -> List[List[int]]:
        return epoch_order(self.train_pairs, self.t, self.cfg.seed, epoch, self.steps_per_epoch, self.sharing)

    def micro_batches(self, start_step: int = 0):
        """Endless (epoch, this rank's indices, batch, pairs in the whole batch) from optimizer
        step `start_step` on."""
        epoch, skip = divmod(start_step, self.steps_per_epoch)
        skip *= self.t.grad_accum
        while True:
            for idx in self.epoch_batches(epoch)[skip:]:
                mine = distributed.shard(idx, self.world, self.rank)
                batch = self._to_device(self.collate([self.train_pairs[i] for i in mine], self.pad_id))
                yield epoch, mine, batch, len(idx)
            epoch, skip = epoch + 1, 0

    # -- one optimizer step

    def train_step(self, micro: List[Tuple[Sequence[int], Dict[str, Tensor], int]]) -> Dict[str, float]:
        """Forward and backward over `grad_accum` micro-batches (this rank's share of each),
        clip, step; return metrics averaged over every pair of the step."""
        self.policy.train()
        n_pairs = sum(n for _, _, n in micro)  # of the whole step, all ranks together
        per_pair: List[Dict[str, Tensor]] = []
        for i, (idx, batch, _) in enumerate(micro):
            sync = i == len(micro) - 1 or self.world == 1 or self.t.fsdp  # DDP: reduce once, at the last
            with self.autocast(), (contextlib.nullcontext() if sync else self.train_logps.no_sync()):
                losses, metrics = self.objective(self.train_logps, self.reference, batch, "train", idx)
                # DDP averages gradients over ranks: scaling by world gives the mean over all pairs
                loss = losses.sum() * self.world / n_pairs
                self._check_finite(loss)
                loss.backward()
            per_pair.append(dict(metrics, loss=losses.detach()))
        grad_norm = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        out = {f"train/{k}": v for k, v in _mean(per_pair, self.device).items()}
        out["train/grad_norm"] = grad_norm
        out["train/lr"] = self.scheduler.get_last_lr()[0]
        return out

    def _check_finite(self, loss: Tensor) -> None:
        bad = float(not torch.isfinite(loss))
        if distributed.reduce_sums({"bad": bad}, self.device)["bad"]:  # every rank stops together
            raise TrainingError(f"non-finite loss ({loss.item()}) at step {self.step + 1}; "
                                f"lower optimizer.lr (= {self.cfg.optimizer.lr}) or check the data")

    def _clip(self) -> float:
        params = [p for p in self.policy.parameters() if p.grad is not None]
        max_norm = self.t.max_grad_norm if self.t.max_grad_norm > 0 else float("inf")
        norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)).item()
        if not math.isfinite(norm):
            raise TrainingError(f"non-finite gradient norm at step {self.step + 1}; "
                                f"lower optimizer.lr (= {self.cfg.optimizer.lr}) or check the data")
        return norm

    # -- eval

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        self.policy.eval()
        per_pair = []
        batches = eval_batches(self.eval_pairs, self.t, self.sharing)
        # Whole batches per rank; under FSDP every rank must join every forward, so each runs all.
        mine = batches if self.t.fsdp else distributed.shard(batches, self.world, self.rank)
        for idx in mine:
            batch = self._to_device(self.collate([self.eval_pairs[i] for i in idx], self.pad_id))
            with self.autocast():
                losses, metrics = self.objective(self.logps, self.reference, batch, "eval", idx)
            per_pair.append(dict(metrics, loss=losses))
        distributed.reshard(self.policy)
        metrics = {f"eval/{k}": v for k, v in _mean(per_pair, self.device, across_ranks=not self.t.fsdp).items()}
        if self.gen_eval is not None:
            metrics.update(self.gen_eval.evaluate(self.policy))
        self.policy.train()
        return metrics

    def _eval_and_report(self) -> Dict[str, float]:
        metrics = self.evaluate()
        self.log_metrics(metrics, self.step)
        for callback in self.on_eval:
            callback(self.step, metrics)
        return metrics

    # -- checkpoints

    def save_checkpoint(self, path: str) -> None:
        """Model, optimizer, scheduler, RNG states, step and history, written atomically to `path`,
        with a manifest that records its hash and the run's settings."""
        checkpoint.save(path, self.step, self.policy, self.optimizer, self.scheduler, self.history,
                        settings=tracking.flatten(self.cfg))

    def load_checkpoint(self, path: str, verified: bool = False) -> None:
        """Go on from the checkpoint `path`, verified first unless `verified` already
        (checkpoint.CheckpointError if it is not intact)."""
        self.step, self.history = checkpoint.load(path, self.policy, self.optimizer, self.scheduler, verified)
        log.info("resumed from %s at step %d", path, self.step)

    def _maybe_checkpoint(self) -> None:
        every = self.t.checkpoint_every
        if self.checkpoint_dir and every and self.step % every == 0 and self.step < self.total_steps:
            if distributed.is_main():
                self.save_checkpoint(os.path.join(self.checkpoint_dir, paths.CHECKPOINT_FILE))
            distributed.barrier()

    # -- the loop

    def fit(self) -> Dict[str, float]:
        """Train for total_steps; return the last train metrics and the final eval metrics."""
        batches = self.micro_batches(self.step)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="DPO",
                   disable=not (self.t.progress and distributed.is_main()), dynamic_ncols=True)
        last: Dict[str, float] = self.history[-1] if self.history else {}
        while self.step < self.total_steps:
            micro = []
            for _ in range(self.t.grad_accum):
                epoch, idx, batch, n_pairs = next(batches)
                micro.append((idx, batch, n_pairs))
            last = self.train_step(micro)
            last["train/epoch"] = epoch + 1
            self.history.append(last)
            if self.step % self.t.log_every == 0 or self.step == self.total_steps:
                self.log_metrics(last, self.step)
            bar.update(1)
            bar.set_postfix(loss=f"{last['train/loss']:.4f}", acc=f"{last['train/rewards/accuracies']:.2f}")
            if self.t.eval_every and self.step % self.t.eval_every == 0 and self.step < self.total_steps:
                self._eval_and_report()
            self._maybe_checkpoint()
        bar.close()
        eval_metrics = self._eval_and_report()
        log.info("final eval: %s", ", ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
        return {**last, **eval_metrics}
