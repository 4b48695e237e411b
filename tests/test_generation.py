"""Sampling with a KV cache, the generation metrics, and the evaluator's identities: the same
weights give the same samples and exactly zero KL."""

import json
import logging

import pytest
import torch

from conftest import compose, make_tiny_llama
from dpo_sweep import models
from dpo_sweep.data import load_preference_data
from dpo_sweep.gen_eval import GenEvaluator, sequence_kl, win_rate
from dpo_sweep.generation import generate
from dpo_sweep.judges.builtin import BuiltinJudge
from dpo_sweep.reference import autocast_for


def prompts(tokenizer):
    texts = ["Uppercase: apple\nAnswer: ", "Reverse: tiger river\nAnswer: ", "Add: 3+40\nAnswer: "]
    return [tokenizer(t)["input_ids"] for t in texts]


def test_greedy_generation_with_the_cache_equals_full_forwards(tiny_model, tokenizer):
    fast = generate(tiny_model, prompts(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, 12, temperature=0)
    slow = generate(tiny_model, prompts(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, 12, temperature=0,
                    use_cache=False)
    assert fast == slow and all(len(a) >= 1 for a in fast)


def test_greedy_is_the_argmax_of_a_plain_forward(tiny_model, tokenizer):
    p = prompts(tokenizer)[0]
    first = generate(tiny_model, [p], tokenizer.eos_token_id, tokenizer.pad_token_id, 1, temperature=0)[0][0]
    with torch.no_grad():
        logits = tiny_model(input_ids=torch.tensor([p])).logits[0, -1]
    assert first == int(logits.argmax())


def test_the_same_seed_gives_the_same_samples(tiny_model, tokenizer):
    args = (tiny_model, prompts(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, 16)
    a, b = generate(*args, temperature=1.0, seed=7), generate(*args, temperature=1.0, seed=7)
    c = generate(*args, temperature=1.0, seed=8)
    assert a == b and a != c
    state = torch.get_rng_state()
    generate(*args, temperature=1.0, seed=7)
    assert torch.equal(state, torch.get_rng_state())  # training's random state is untouched


def test_each_group_of_a_batch_samples_as_it_would_alone(tiny_model, tokenizer):
    """groups=3 (a packed model's trials, one block of rows each): every block draws with its own
    generator of the same seed, so each gets the answers the prompts get alone."""
    ps = prompts(tokenizer)
    alone = generate(tiny_model, ps, tokenizer.eos_token_id, tokenizer.pad_token_id, 16, temperature=1.0, seed=7)
    together = generate(tiny_model, ps * 3, tokenizer.eos_token_id, tokenizer.pad_token_id, 16, temperature=1.0,
                        seed=7, groups=3)
    assert together == alone * 3
    one_generator = generate(tiny_model, ps * 3, tokenizer.eos_token_id, tokenizer.pad_token_id, 16,
                             temperature=1.0, seed=7)
    assert one_generator != alone * 3  # one generator for all rows would draw differently


def test_an_answer_stops_at_its_first_eos(tokenizer):
    """Once EOS is the likeliest token after two answer tokens, every answer is those two
    tokens and EOS: nothing after it."""
    model = make_tiny_llama(tokenizer)
    calls = []

    def eos_from_the_third_token(module, args, output):
        calls.append(1)
        if len(calls) >= 3:  # the prompt's forward, then one per new token
            output[..., tokenizer.eos_token_id] += 1e4
        return output

    model.lm_head.register_forward_hook(eos_from_the_third_token)
    answers = generate(model, prompts(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, 8, temperature=0)
    assert [len(a) for a in answers] == [3, 3, 3] and all(a[-1] == tokenizer.eos_token_id for a in answers)
    assert all(tokenizer.eos_token_id not in a[:-1] for a in answers)
    assert len(calls) == 3  # everyone done: no further forward


def test_win_rate_by_hand_with_ties():
    # wins 1, tie 0.5, win 1, loss 0 -> 2.5 / 4
    assert win_rate([1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]) == pytest.approx(0.625)
    assert win_rate([0.3, 0.3], [0.3, 0.3]) == 0.5  # all ties
    assert win_rate([2.0], [1.0]) == 1.0


def test_sequence_kl_by_hand():
    assert sequence_kl([-1.0, -3.0], [-2.0, -2.0]) == pytest.approx(0.0)  # (1 + -1) / 2
    assert sequence_kl([-1.0, -1.0], [-3.0, -2.0]) == pytest.approx(1.5)


def test_kl_is_zero_and_the_policy_ties_when_it_is_the_reference(tokenizer, tmp_path):
    """Same weights: the policy's samples are the reference's (same seed), their log-probs agree
    exactly, so KL is 0, the reward equals the reference's and the win rate is one half."""
    cfg = compose(["dataset.builtin_size=60", "dataset.eval_size=20", "eval.gen.prompts=12",
                   "eval.gen.max_new_tokens=10"])
    data = load_preference_data(cfg.dataset, tokenizer, 128, 64)
    policy = make_tiny_llama(tokenizer)
    reference = models.make_reference(policy)
    evaluator = GenEvaluator(cfg.eval.gen, BuiltinJudge(), tokenizer, data.eval, reference, autocast_for(
        torch.device("cpu"), "fp32"), batch_size=5, cache_dir=str(tmp_path))
    metrics = evaluator.evaluate(policy)
    assert metrics["eval/gen/kl"] == 0.0
    assert metrics["eval/gen/reward"] == metrics["eval/gen/ref_reward"] and metrics["eval/gen/win_rate"] == 0.5
    assert [r["policy_answer"] for r in evaluator.last_rows] == evaluator.reference.texts
    assert len(evaluator.last_rows) == 12 and 1 <= metrics["eval/gen/length"] <= 10


def test_reference_samples_are_cached_and_reused(tokenizer, tmp_path, caplog):
    cfg = compose(["dataset.builtin_size=60", "dataset.eval_size=20", "eval.gen.prompts=6",
                   "eval.gen.max_new_tokens=6"])
    data = load_preference_data(cfg.dataset, tokenizer, 128, 64)
    reference = models.make_reference(make_tiny_llama(tokenizer))
    autocast = autocast_for(torch.device("cpu"), "fp32")
    first = GenEvaluator(cfg.eval.gen, BuiltinJudge(), tokenizer, data.eval, reference, autocast, 4, str(tmp_path))
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2 and files[0].name.startswith("refsamples-") and files[1].name == files[0].name + ".sha256"
    saved = json.loads(files[0].read_text())
    with caplog.at_level(logging.INFO):
        again = GenEvaluator(cfg.eval.gen, BuiltinJudge(), tokenizer, data.eval, reference, autocast, 4, str(tmp_path))
    assert f"reference samples from cache {files[0]}" in caplog.text  # read, not drawn again
    assert again.reference.answers == first.reference.answers == saved["answers"]
    assert again.reference.ref_logps == first.reference.ref_logps
    cfg.eval.gen.seed = 1  # another generation setting: another entry
    GenEvaluator(cfg.eval.gen, BuiltinJudge(), tokenizer, data.eval, reference, autocast, 4, str(tmp_path))
    assert len(list(tmp_path.glob("refsamples-*.json"))) == 2
