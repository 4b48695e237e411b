"""Generation-based evaluation: what the policy now writes, judged, beside what it cost.

At each eval the policy answers a fixed set of held-out prompts (`eval.gen.*`); a judge scores the
answers; the same prompts' reference answers (sampled once from the reference with the same
settings and seed, cached in `outputs/cache/` for every trial of a sweep) give the baseline:

    eval/gen/reward      mean judge score of the policy's answers
    eval/gen/win_rate    share of answers scoring above the reference answer to the same prompt
                         (sample i against sample i); ties count half
    eval/gen/kl          mean over the policy's answers of log pi(y|x) - log pi_ref(y|x), summed
                         over the answer's tokens: a sequence-level KL(pi || pi_ref) estimate
                         (unbiased at eval.gen.temperature = 1)
    eval/gen/length      mean answer tokens (EOS included)
    eval/gen/ref_reward  mean judge score of the reference's answers

The reward metrics are left out when the judge gives no reward (`judge=none`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from dpo_sweep import cache_files
from dpo_sweep.batching import collate
from dpo_sweep.generation import generate
from dpo_sweep.judges import Judge
from dpo_sweep.logprobs import sequence_logps
from dpo_sweep.pairs import Pair
from dpo_sweep.reference import fingerprint

log = logging.getLogger(__name__)
SAMPLES_FILE = "samples.jsonl"


# -- the metrics, pure


def win_rate(policy_scores: Sequence[float], ref_scores: Sequence[float]) -> float:
    """Share of answers scoring above their reference answer; a tie counts half."""
    wins = [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy_scores, ref_scores)]
    return sum(wins) / len(wins)


def sequence_kl(policy_logps: Sequence[float], ref_logps: Sequence[float]) -> float:
    """Mean of log pi(y|x) - log pi_ref(y|x) over answers y sampled from pi."""
    return sum(p - r for p, r in zip(policy_logps, ref_logps)) / len(policy_logps)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


# -- scoring answers under a model


@torch.no_grad()
def answer_logps(model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int,
                 batch_size: int, autocast: Callable[[], ContextManager]) -> List[float]:
    """log p(answer | prompt) summed over the answer's tokens, for each (prompt, answer)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: List[float] = []
    for start in range(0, len(prompts), batch_size):
        pairs = [Pair(tuple(p), tuple(a), tuple(a), 0) for p, a in
                 zip(prompts[start : start + batch_size], answers[start : start + batch_size])]
        batch = {k: v.to(device) for k, v in collate(pairs, pad_id).items()}
        n = len(pairs)
        with autocast():
            logps, _ = sequence_logps(model, batch["input_ids"][:n], batch["attention_mask"][:n],
                                      batch["loss_mask"][:n])
        out += logps.float().tolist()
    model.train(was_training)
    return out


@dataclass
class Samples:
    """Answers to the eval prompts (sample i of prompt j at j * samples + i), with their scores."""

    answers: List[List[int]]
    texts: List[str]
    rewards: Optional[List[float]]
    ref_logps: List[float]  # log pi_ref of each answer


class GenEvaluator:
    """Samples the policy at each eval and compares it with the reference's cached samples.

    `reference_model` scores answers under the reference: a frozen copy, or the policy itself
    with its LoRA adapters off (`adapters_off`)."""

    def __init__(self, gen: DictConfig, judge: Judge, tokenizer, eval_pairs: Sequence[Pair], reference_model,
                 autocast: Callable[[], ContextManager], batch_size: int, cache_dir: Optional[str],
                 adapters_off: bool = False):
        self.gen, self.judge, self.tokenizer = gen, judge, tokenizer
        self.autocast, self.batch_size, self.adapters_off = autocast, batch_size, adapters_off
        self.reference_model = reference_model
        chosen = list(eval_pairs[: gen.prompts])
        self.prompts = [p.prompt_ids for p in chosen for _ in range(gen.samples)]
        self.prompt_texts = [tokenizer.decode(p, skip_special_tokens=True) for p in self.prompts]
        self.reference = self._reference_samples(cache_dir)
        self.last_rows: List[Dict[str, object]] = []

    # -- the reference's samples, once

    def _cache_key(self) -> str:
        h = hashlib.sha256()
        h.update(fingerprint(self.reference_model, {}, f"adapters_off={self.adapters_off}").encode())
        h.update(json.dumps({"prompts": self.prompts, "max_new_tokens": self.gen.max_new_tokens,
                             "temperature": self.gen.temperature, "seed": self.gen.seed}).encode())
        return h.hexdigest()[:32]

    def _reference_samples(self, cache_dir: Optional[str]) -> Samples:
        path = os.path.join(cache_dir, f"refsamples-{self._cache_key()}.json") if cache_dir else None
        saved = cache_files.load_json(path, "reference sample") if path else None
        if isinstance(saved, dict) and {"answers", "ref_logps"} <= set(saved):
            log.info("reference samples from cache %s", path)
            answers, ref_logps = saved["answers"], saved["ref_logps"]
        else:
            with self._reference_weights():
                answers = self._sample(self.reference_model)
                ref_logps = self._logps(self.reference_model, answers)
            if path:
                cache_files.save_json(path, {"answers": answers, "ref_logps": ref_logps})
                log.info("reference samples cached at %s", path)
        texts = self._texts(answers)
        return Samples(answers, texts, self.judge.score(self.prompt_texts, texts), ref_logps)

    def _reference_weights(self) -> ContextManager:
        """Inside it, `reference_model` is the reference (a LoRA policy's adapters are off)."""
        return self.reference_model.disable_adapter() if self.adapters_off else contextlib.nullcontext()

    def _sample(self, model) -> List[List[int]]:
        return self.sample_groups(model, 1)[0]

    def sample_groups(self, model, groups: int) -> List[List[List[int]]]:
        """The answers of `groups` policies at once, one list each: a packed model whose trials
        each take a block of the batch (each block draws as that policy would alone)."""
        answers: List[List[List[int]]] = [[] for _ in range(groups)]
        g = self.gen
        for start in range(0, len(self.prompts), self.batch_size):
            prompts = self.prompts[start : start + self.batch_size]
            out = generate(model, prompts * groups, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                           g.max_new_tokens, g.temperature, g.seed + start, autocast=self.autocast, groups=groups)
            for j in range(groups):
                answers[j] += out[j * len(prompts) : (j + 1) * len(prompts)]
        return answers

    def _logps(self, model, answers: Sequence[Sequence[int]]) -> List[float]:
        return answer_logps(model, self.prompts, answers, self.tokenizer.pad_token_id, self.batch_size, self.autocast)

    def _texts(self, answers: Sequence[Sequence[int]]) -> List[str]:
        return [self.tokenizer.decode(a, skip_special_tokens=True) for a in answers]

    # -- each eval

    def evaluate(self, policy, answers: Optional[List[List[int]]] = None) -> Dict[str, float]:
        """The eval/gen/* metrics of the policy now (of its `answers` when sampled already,
        `sample_groups`); the samples are kept in `last_rows`."""
        answers = self._sample(policy) if answers is None else answers
        texts = self._texts(answers)
        policy_logps = self._logps(policy, answers)
        with self._reference_weights():
            ref_logps = self._logps(self.reference_model, answers)
        rewards = self.judge.score(self.prompt_texts, texts)
        metrics = {"eval/gen/kl": sequence_kl(policy_logps, ref_logps),
                   "eval/gen/length": mean([len(a) for a in answers])}
        if rewards is not None and self.reference.rewards is not None:
            metrics.update({"eval/gen/reward": mean(rewards),
                            "eval/gen/win_rate": win_rate(rewards, self.reference.rewards),
                            "eval/gen/ref_reward": mean(self.reference.rewards)})
        self.last_rows = self._rows(texts, rewards, policy_logps, ref_logps)
        return metrics

    def _rows(self, texts, rewards, policy_logps, ref_logps) -> List[Dict[str, object]]:
        ref = self.reference
        return [{"prompt": self.prompt_texts[i], "reference_answer": ref.texts[i], "policy_answer": texts[i],
                 "reference_reward": None if ref.rewards is None else ref.rewards[i],
                 "policy_reward": None if rewards is None else rewards[i],
                 "kl": policy_logps[i] - ref_logps[i]} for i in range(len(texts))]

    def write_samples(self, folder: str) -> str:
        """The last eval's samples as `samples.jsonl` in `folder`."""
        path = os.path.join(folder, SAMPLES_FILE)
        with open(path, "w") as f:
            for row in self.last_rows:
                f.write(json.dumps(row) + "\n")
        return path


def build_gen_eval(cfg: DictConfig, policy, run, cwd: Optional[str], reference_model=None) -> Optional[GenEvaluator]:
    """The run's generation evaluator (`eval.gen.enabled`), or None. The reference that scores
    answers: `reference_model` (a live frozen copy the run already holds), the policy with its
    adapters off (LoRA), or a frozen copy of the policy as it starts."""
    from dpo_sweep import models, paths
    from dpo_sweep.config import judge_name
    from dpo_sweep.judges import build_judge

    if not cfg.eval.gen.enabled:
        return None
    if cfg.train.fsdp:
        log.warning("eval.gen: not run under train.fsdp=true (a sharded model generates only with every rank); "
                    "the eval/gen/* metrics are left out")
        return None
    judge_cfg = OmegaConf.merge(cfg.judge, {"name": judge_name(cfg)})
    judge = build_judge(judge_cfg, run.device)
    adapters_off = models.is_lora(policy)
    if reference_model is None:
        reference_model = policy if adapters_off else models.make_reference(policy)
    return GenEvaluator(cfg.eval.gen, judge, run.tokenizer, run.data.eval, reference_model, run.autocast,
                        cfg.eval.gen.batch_size, paths.cache_dir(cwd), adapters_off=adapters_off)
