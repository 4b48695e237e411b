"""Judges: the built-in tasks' rule checked by hand, a reward model built from a tiny config and
saved to a folder, and a model without a classification head refused before training."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from conftest import compose, make_tiny_llama
from dpo_sweep.config import ConfigError
from dpo_sweep.judges import build_judge
from dpo_sweep.judges.builtin import BuiltinJudge
from dpo_sweep.tasks import builtin_rows, solve

CASES = [  # (prompt, answer, score)
    ("Uppercase: apple river\nAnswer: ", "APPLE RIVER", 1.0),
    ("Uppercase: apple river\nAnswer: ", "apple river", 0.0),  # copied
    ("Uppercase: apple river\nAnswer: ", "APPLE RIVER APPLE", 0.0),  # over-long
    ("Uppercase: apple river\nAnswer: ", " APPLE RIVER\n", 1.0),  # surrounding whitespace aside
    ("Sort: 3 1 2\nAnswer: ", "1 2 3", 1.0),
    ("Sort: 3 1 2\nAnswer: ", "3 2 1", 0.0),
    ("Sort: 3 1 2\nAnswer: ", "", 0.0),  # empty
    ("Add: 7+35\nAnswer: ", "42", 1.0),
    ("Add: 7+35\nAnswer: ", "735", 0.0),
    ("Add: 7+35\nAnswer: ", "4", 0.0),  # cut short
    ("Reverse: tiger\nAnswer: ", "regit", 1.0),
    ("Reverse: tiger\nAnswer: ", "tiger", 0.0),
    ("Reverse: tiger\nAnswer: ", "regitregit", 0.0),
    ("Translate: tiger\nAnswer: ", "tiger", 0.0),  # not a built-in task
]


def test_builtin_judge_scores_by_each_tasks_rule():
    prompts, answers, expected = zip(*CASES)
    assert BuiltinJudge().score(prompts, answers) == list(expected)


@pytest.mark.parametrize("version", [1, 2])
def test_every_built_in_row_is_judged_right_for_chosen_and_wrong_for_rejected(version):
    rows = builtin_rows(200, version=version)
    judge = BuiltinJudge()
    assert judge.score([r["prompt"] for r in rows], [r["chosen"] for r in rows]) == [1.0] * 200
    assert judge.score([r["prompt"] for r in rows], [r["rejected"] for r in rows]) == [0.0] * 200
    assert solve("a system line\nUppercase: abc\nAnswer: ") == "ABC"  # text before the task is ignored


def tiny_reward_model(folder, tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_reward_model_judge_scores_a_batch(tmp_path, tokenizer):
    folder = tiny_reward_model(tmp_path / "rm", tokenizer)
    cfg = compose(["judge=reward_model", f"judge.name_or_path={folder}", "judge.batch_size=2"])
    judge = build_judge(cfg.judge, torch.device("cpu"))
    prompts = ["Add: 1+2\nAnswer: "] * 3 + ["Reverse: tiger\nAnswer: "]
    answers = ["3", "12", "three and more", "regit"]
    scores = judge.score(prompts, answers)
    assert len(scores) == 4 and len(set(scores)) == 4  # one score each, answers told apart
    assert judge.score(prompts[::-1], answers[::-1]) == pytest.approx(scores[::-1], abs=1e-5)  # batching aside
    # The tokenizer's chat template renders the exchange (user: prompt, assistant: answer).
    assert "<|assistant|>" in judge.render("Add: 1+2", "3") and judge.render("Add: 1+2", "3").count("Add: 1+2") == 1
    with torch.no_grad():
        alone = judge.model(**judge.tokenizer([judge.render(prompts[0], answers[0])], return_tensors="pt")).logits
    assert scores[0] == pytest.approx(float(alone[0, 0]), abs=1e-5)


def test_a_model_without_a_classification_head_stops_the_run_before_training(tmp_path, tokenizer, monkeypatch):
    from dpo_sweep.run import run_trial

    folder = tmp_path / "causal"
    make_tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.chdir(tmp_path)
    cfg = compose(["judge=reward_model", f"judge.name_or_path={folder}", "tracking.enabled=false",
                   "train.progress=false"])
    with pytest.raises(ConfigError, match=f"config key 'judge.name_or_path' = '{folder}'.*sequence-classification"):
        run_trial(cfg, out_dir=str(tmp_path / "run"))
    assert not (tmp_path / "outputs").exists()  # nothing trained, nothing cached: SFT and the reference never ran


def test_reward_model_judge_needs_a_model():
    cfg = compose(["judge=reward_model"])
    from dpo_sweep.config import validate

    with pytest.raises(ConfigError, match="judge.name_or_path"):
        validate(cfg)


@pytest.mark.parametrize("override, key", [
    ("eval.gen.prompts=0", "eval.gen.prompts"), ("eval.gen.max_new_tokens=0", "eval.gen.max_new_tokens"),
    ("eval.gen.temperature=-1", "eval.gen.temperature"), ("sft.steps=0", "sft.steps"), ("sft.lr=0", "sft.lr"),
    ("sft.rejected_share=1.5", "sft.rejected_share"), ("judge.name=oracle", "judge.name"),
    ("dataset.builtin_version=4", "dataset.builtin_version"),
])
def test_bad_generation_judge_and_sft_settings_name_their_key(override, key):
    from dpo_sweep.config import validate

    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        validate(compose([override]))


def test_a_judged_objective_without_a_judge_is_refused_before_training():
    from dpo_sweep.config import objective_spec, validate

    with pytest.raises(ConfigError, match="'objective.metric' = 'eval/gen/reward'.*needs a judge"):
        validate(compose(["judge=none", "objective.metric=eval/gen/reward"]))
    with pytest.raises(ConfigError, match="'objective.metric' = 'eval/gen/kl'.*eval.gen.enabled=true"):
        validate(compose(["eval.gen.enabled=false", "objective.metric=eval/gen/kl"]))
    assert objective_spec(compose(["judge=none"])) == [("eval/rewards/accuracies", "maximize")]  # auto
    assert objective_spec(compose()) == [("eval/gen/reward", "maximize")]
