"""trainer=trl: TRL's DPOTrainer on the same composed config gives our Trainer's numbers step by
step, logs to the same run folder and MLflow layout, and refuses what it cannot honour by key."""

import json
import math

import pytest
from mlflow.tracking import MlflowClient

from conftest import compose
from dpo_sweep.config import ConfigError, validate
from dpo_sweep.run import build_trainer, run_trial, seed_everything

trl = pytest.importorskip("trl")
from dpo_sweep import trl_backend  # noqa: E402

# 64 train pairs (8 full batches of 8) and 8 eval pairs of the built-in set; a smaller tiny
# Llama; CPU, fp32.
SMALL = ["dataset.builtin_size=72", "dataset.eval_size=8", "train.batch_size=8", "train.eval_batch_size=8",
         "model.config.hidden_size=32", "model.config.intermediate_size=64", "train.device=cpu",
         "train.progress=false", "tracking.enabled=false"]
LN2 = math.log(2)
# name: (overrides, first-step loss). At step 1 policy == reference, so the log-ratio margin h is
# 0: sigmoid and robust give ln 2, IPO (1 / (2 beta))^2 = 25 with beta 0.1.
CASES = {
    # The defaults for one epoch of 30 pairs (a partial batch of 6 somewhere): shuffled,
    # length-grouped batches, linear schedule with warmup, precomputed reference, sigmoid; eval
    # in batches of 3, 3, 2.
    "defaults": (["dataset.builtin_size=38", "train.eval_batch_size=3"], LN2),
    # Accumulation, cosine with warmup, clipping that bites, weight decay, a live reference copy,
    # gradient checkpointing, IPO (length-normalised in both), and an eval in the middle.
    "accum-cosine-ipo": (["train.batch_size=4", "train.grad_accum=2", "train.max_steps=3", "train.lr_schedule=cosine",
                          "train.warmup_steps=1", "train.max_grad_norm=0.05", "optimizer.weight_decay=0.1",
                          "train.reference=copy", "train.gradient_checkpointing=true", "loss=ipo",
                          "train.eval_every=2"], 25.0),
    # LoRA adapters; the reference is the base model (adapters off in ours, a frozen copy of the
    # fresh adapter in TRL).
    "lora": (["model.lora.enabled=true", "optimizer.lr=1e-2", "train.max_steps=3", "train.reference=copy"], LN2),
    # Two epochs (each reshuffled) of 16 pairs, robust loss, constant schedule, no clipping.
    "epochs-robust": (["dataset.builtin_size=24", "train.epochs=2", "loss=robust", "train.lr_schedule=constant",
                       "train.max_grad_norm=0"], LN2),
}


def fit(overrides, out_dir, backend):
    """(per-step train metrics, (step, metrics) of each eval, final metrics) of one backend."""
    cfg = compose(SMALL + overrides + [f"trainer={backend}"])
    validate(cfg)
    seed_everything(cfg.seed)  # as run_trial does: LoRA adapters draw from the global RNG
    evals = []
    on_eval = [lambda step, metrics: evals.append((step, metrics))]
    if backend == "trl":
        trainer, _ = trl_backend.build_trainer(cfg, str(out_dir), on_eval=on_eval)
    else:
        trainer, _ = build_trainer(cfg, on_eval=on_eval)
    final = trainer.fit()
    return trainer.history, evals, final


def assert_same(ours, theirs, where):
    assert set(ours) == set(theirs), where
    for key, value in ours.items():
        assert theirs[key] == pytest.approx(value, rel=1e-5, abs=1e-5), f"{where}: {key} ours {value} TRL {theirs[key]}"


@pytest.mark.parametrize("case", list(CASES))
def test_trl_backend_gives_our_numbers_step_by_step(tmp_path, monkeypatch, case):
    if case == "lora":
        pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)  # our precomputed reference caches under ./outputs/cache
    overrides, first_loss = CASES[case]
    ours, our_evals, our_final = fit(overrides, tmp_path / "ours", "dpo_sweep")
    theirs, their_evals, their_final = fit(overrides, tmp_path / "trl", "trl")

    assert theirs[0]["train/loss"] == pytest.approx(first_loss, rel=1e-6)
    assert len(ours) == len(theirs) >= 3
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        assert_same(a, b, f"step {step}")
    assert [s for s, _ in their_evals] == [s for s, _ in our_evals]
    for (step, a), (_, b) in zip(our_evals, their_evals):
        assert_same(a, b, f"eval at step {step}")
    assert_same(our_final, their_final, "final metrics")
    assert ours[-1]["train/rewards/margins"] != 0.0  # the policy moved away from the reference


@pytest.mark.parametrize("overrides,key", [
    (["loss=cdpo"], "loss.label_smoothing"),
    (["train.reference=none"], "train.reference"),
    (["loss=ipo", "loss.length_normalize=false"], "loss.length_normalize"),
    (["loss.length_normalize=true"], "loss.length_normalize"),
    (["train.device=cuda:1"], "train.device"),
    (["train.checkpoint_every=2"], "train.checkpoint_every"),
    (["train.resume=true"], "train.resume"),
    (["train.fsdp=true"], "train.fsdp"),
])
def test_settings_trl_cannot_honour_name_the_key(tmp_path, overrides, key):
    cfg = compose(SMALL + ["trainer=trl", "train.max_steps=1"] + overrides)
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        run_trial(cfg, out_dir=str(tmp_path))


def test_unknown_trainer_names_the_key():
    with pytest.raises(ConfigError, match="config key 'trainer' = 'pytorch': expected one of dpo_sweep, trl"):
        validate(compose(["trainer=pytorch"]))


def test_trainer_trl_writes_metrics_json_and_mlflow_run(tmp_path):
    """run_trial as `python -m dpo_sweep trainer=trl ...` runs it: the run folder and MLflow hold
    what they hold for our trainer."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [o for o in SMALL if not o.startswith("tracking.")]
    cfg = compose(overrides + ["trainer=trl", "train.max_steps=4", "train.eval_every=2", "train.save_model=true",
                               f"tracking.uri={uri}", "beta=0.2"])
    run_dir = tmp_path / "run"
    objective = run_trial(cfg, out_dir=str(run_dir))

    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["objective_metric"] == "eval/gen/reward"  # objective.metric=auto with the builtin judge
    assert result["objective"] == objective == result["metrics"]["eval/gen/reward"]
    names = {f"{split}/{m}" for split in ("train", "eval") for m in trl_backend.SHARED_METRICS}
    gen = {f"eval/gen/{m}" for m in ("reward", "win_rate", "kl", "length", "ref_reward")}
    assert set(result["metrics"]) == names | gen | {"train/grad_norm", "train/lr", "train/epoch"}
    assert (run_dir / "model" / "config.json").is_file()

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dpo-sweep").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer"] == "trl" and run.data.params["beta"] == "0.2"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    assert losses[0].value == pytest.approx(LN2, rel=1e-6)  # policy == reference at step 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/rewards/accuracies")] == [2, 4]
    assert run.data.metrics["eval/loss"] == pytest.approx(result["metrics"]["eval/loss"])
    assert run.data.metrics["objective"] == pytest.approx(objective)
    assert run.data.tags["run_dir"] == str(run_dir)
    assert "metrics.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
