"""Packed LoRA trials (dpo_sweep/packing): several trials over one frozen base model train as each
would alone, their gradients never mix, and a lane that fails or is pruned leaves the others be."""

import json
import os

import pytest
import torch
from torch.testing import assert_close

from conftest import compose
from dpo_sweep.packing.lora import lane_name, save_lane
from dpo_sweep.packing.run import build_pack, run_pack
from dpo_sweep.run import build_trainer, run_trial
from dpo_sweep.trainer import TrialStopped

pytest.importorskip("peft")

BASE = ["model.lora.enabled=true", "train.max_steps=8", "train.eval_every=4", "train.progress=false",
        "tracking.enabled=false", "sft.steps=40"]
# Three trials that differ in everything a pack may hold: beta, learning rate, loss type, rank.
TRIALS = [["beta=0.1", "optimizer.lr=2e-4", "loss=sigmoid"],
          ["beta=0.3", "optimizer.lr=1e-3", "loss=ipo"],
          ["beta=0.05", "optimizer.lr=5e-4", "loss=hinge", "model.lora.r=8", "model.lora.alpha=8"]]


def configs(extra=(), trials=TRIALS):
    return [compose(BASE + list(extra) + t) for t in trials]


def alone(cfg):
    trainer, _ = build_trainer(cfg)
    metrics = trainer.fit()
    return trainer, metrics


@pytest.mark.parametrize("share_prompt,per_forward", [("true", 0), ("false", 1)])
def test_each_packed_trial_equals_the_same_trial_alone(tmp_path, monkeypatch, share_prompt, per_forward):
    """Per-step train metrics and final metrics (pairwise and generated) within 1e-5 in fp32, with
    the trials through the model together (per_forward 0: a GPU's default) or one at a time (a CPU's)."""
    monkeypatch.chdir(tmp_path)
    cfgs = configs([f"train.share_prompt={share_prompt}"])
    packed, _ = build_pack(cfgs, None, [None] * 3, per_forward)
    packed.fit()
    assert [lane.finished for lane in packed.lanes] == [True] * 3
    for cfg, lane in zip(cfgs, packed.lanes):
        trainer, metrics = alone(cfg)
        assert len(lane.history) == len(trainer.history) == 8
        for step, (ours, theirs) in enumerate(zip(lane.history, trainer.history), start=1):
            assert ours.keys() == theirs.keys()
            for key in theirs:
                assert ours[key] == pytest.approx(theirs[key], abs=1e-5, rel=1e-5), (lane.label, step, key)
        assert lane.metrics.keys() == metrics.keys()
        assert "eval/gen/reward" in metrics
        for key in metrics:
            assert lane.metrics[key] == pytest.approx(metrics[key], abs=1e-5, rel=1e-5), (lane.label, key)
    losses = [lane.history[-1]["train/loss"] for lane in packed.lanes]
    assert len(set(losses)) == 3  # three different trials, not one trained three times


def test_gradients_never_leak_between_adapters(tmp_path, monkeypatch):
    """Lane 0's adapter after two steps is the same, bit for bit, whatever lane 1's beta is, and
    lane 1's is not."""
    monkeypatch.chdir(tmp_path)
    after = []
    for beta in ("0.1", "0.9"):
        cfgs = configs(["eval.gen.enabled=false"], [TRIALS[0], [f"beta={beta}", "optimizer.lr=1e-3"]])
        trainer, _ = build_pack(cfgs, None, [None, None], per_forward=0)  # one forward for both
        for step in range(2):
            trainer.train_step(trainer.lanes, trainer.step_batches(step))
        after.append([[p.detach().clone() for p in lane.params] for lane in trainer.lanes])
    (first0, first1), (second0, second1) = after
    assert all(torch.equal(a, b) for a, b in zip(first0, second0))
    assert not all(torch.equal(a, b) for a, b in zip(first1, second1))


def test_a_failed_or_pruned_trial_leaves_the_pack_and_the_others_go_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trials = [TRIALS[0], ["beta=0.1", "optimizer.lr=1e30", "train.max_grad_norm=0"], TRIALS[1]]
    cfgs = configs(["eval.gen.enabled=false"], trials)
    trainer, _ = build_pack(cfgs, None, [None] * 3, per_forward=0)

    def prune(step, metrics):
        raise TrialStopped(f"pruned at step {step}")

    trainer.lanes[2].on_eval.append(prune)
    trainer.fit()
    ok, diverged, pruned = trainer.lanes
    assert ok.finished and ok.error is None and ok.step == 8
    assert "non-finite" in str(diverged.error) and diverged.step < 8
    assert isinstance(pruned.error, TrialStopped) and pruned.step == 4
    _, metrics = alone(cfgs[0])
    for key in metrics:
        assert ok.metrics[key] == pytest.approx(metrics[key], abs=1e-5, rel=1e-5), key


def test_a_lane_checkpoint_resumes_as_a_lone_run(tmp_path, monkeypatch):
    """A packed trial's checkpoint holds what a lone run's does: a lone run of its config goes on
    from it to the numbers the pack reaches."""
    monkeypatch.chdir(tmp_path)
    cfgs = configs(["eval.gen.enabled=false", "train.eval_every=0"])
    trainer, _ = build_pack(cfgs, None, [None] * 3)
    for step in range(5):
        trainer.train_step(trainer.lanes, trainer.step_batches(step))
    path = str(tmp_path / "lane1.pt")
    trainer.save_checkpoint(trainer.lanes[1], path)
    trainer.fit()
    lone, _ = build_trainer(cfgs[1])
    lone.load_checkpoint(path)
    assert lone.step == 5
    metrics = lone.fit()
    for key in metrics:
        assert trainer.lanes[1].metrics[key] == pytest.approx(metrics[key], abs=1e-5, rel=1e-5), key


def test_a_packed_trial_saves_an_ordinary_peft_adapter(tmp_path, monkeypatch):
    from peft import PeftModel

    from dpo_sweep import models

    monkeypatch.chdir(tmp_path)
    cfgs = configs(["eval.gen.enabled=false", "train.max_steps=3", "sft.enabled=false"])
    trainer, tokenizer = build_pack(cfgs, None, [None] * 3)
    trainer.fit()
    ids = torch.tensor([tokenizer("Reverse: abc").input_ids])
    for j in (1, 2):
        save_lane(trainer.policy, lane_name(j), tokenizer, str(tmp_path / f"lane{j}"), merge=False)
        assert os.path.isfile(tmp_path / f"lane{j}" / "adapter_model.safetensors")
        base = models.load_policy(compose(["sft.enabled=false"]).model, tokenizer, 0).eval()
        loaded = PeftModel.from_pretrained(base, str(tmp_path / f"lane{j}")).eval()
        trainer.policy.eval()
        with torch.no_grad(), trainer.router.route([lane_name(j)]):
            expected = trainer.policy(input_ids=ids).logits
        assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    save_lane(trainer.policy, lane_name(2), tokenizer, str(tmp_path / "merged"), merge=True)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_run_pack_writes_each_trial_as_a_lone_run_does(tmp_path, monkeypatch):
    """metrics.json, samples and MLflow runs per trial; the same objective as a lone run."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfgs = configs([f"tracking.uri={uri}", "tracking.enabled=true", "train.max_steps=4", "train.eval_every=2"],
                   TRIALS[:2])
    outcomes = run_pack(cfgs, [str(tmp_path / "p0"), str(tmp_path / "p1")])
    assert [o["state"] for o in outcomes] == ["COMPLETE", "COMPLETE"]
    run_trial(cfgs[1], out_dir=str(tmp_path / "a1"))
    packed, lone = (json.load(open(tmp_path / d / "metrics.json")) for d in ("p1", "a1"))
    assert packed["objective"] == pytest.approx(lone["objective"], abs=1e-5)
    assert packed["objective"] == outcomes[1]["value"]
    assert sorted(os.listdir(tmp_path / "p1")) == sorted(os.listdir(tmp_path / "a1"))

    from dpo_sweep import tracking

    runs = {r.name: r for r in tracking.find_runs(uri, cfgs[0].tracking.experiment)}
    assert {runs[n].status for n in ("p0", "p1", "a1")} == {"FINISHED"}
    assert runs["p1"].params.keys() == runs["a1"].params.keys()
    assert set(runs["p1"].metrics) == set(runs["a1"].metrics)
