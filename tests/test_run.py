"""End to end: `python -m dpo_sweep` writes the run folder and an MLflow run; bad config fails early."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hydra.errors import ConfigCompositionException
from mlflow.tracking import MlflowClient

from conftest import REPO, compose, write_jsonl
from dpo_sweep.config import ConfigError, validate
from dpo_sweep.models import load_policy, load_tokenizer
from dpo_sweep.run import run_trial


def run_cli(*args, cwd=REPO, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "dpo_sweep", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    uri = f"sqlite:///{tmp}/mlflow.db"
    proc = run_cli("train.max_steps=6", "train.eval_every=3", "train.save_model=true", "train.progress=false",
                   f"hydra.run.dir={tmp}/run", f"tracking.uri={uri}", "beta=0.2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", uri


def test_run_folder_holds_config_metrics_and_model(finished_run):
    run_dir, _ = finished_run
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "metrics.json",
                 "model/config.json", "model/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["objective_metric"] == "eval/gen/reward"  # objective.metric=auto with the builtin judge
    assert result["objective"] == result["metrics"]["eval/gen/reward"]
    assert 0.0 <= result["objective"] <= 1.0


def test_mlflow_run_has_params_metrics_and_artifacts(finished_run):
    run_dir, uri = finished_run
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("dpo-sweep")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["beta"] == "0.2"
    assert run.data.params["train.max_steps"] == "6"
    assert run.data.params["model.config.model_type"] == "llama"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/rewards/accuracies")] == [3, 6]
    saved = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert run.data.metrics["eval/loss"] == pytest.approx(saved["eval/loss"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "hydra")}
    assert {"hydra/config.yaml", "hydra/overrides.yaml"} <= artifacts
    assert run.data.tags["run_dir"] == str(run_dir)


def test_every_trainable_parameter_changed(finished_run):
    from transformers import AutoModelForCausalLM

    run_dir, _ = finished_run
    cfg = compose([])
    initial = load_policy(cfg.model, load_tokenizer(cfg.model), cfg.seed)
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    before = dict(initial.named_parameters())
    for name, p in trained.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change"


def test_same_config_gives_same_numbers(tmp_path):
    overrides = ["train.max_steps=4", "train.progress=false", "tracking.enabled=false"]
    a = run_trial(compose(overrides), out_dir=str(tmp_path / "a"))
    b = run_trial(compose(overrides), out_dir=str(tmp_path / "b"))
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())["metrics"]
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())["metrics"]
    assert a == b and ma == mb


# Each loss at step 1, where the policy is still its reference (h = 0): -log sigmoid(0) = ln 2 for
# sigmoid, cdpo and robust (their label smoothing cancels at 0), (0 - 1/(2 beta))^2 = 25 for ipo
# at beta 0.1, relu(1 - 0) = 1 for hinge.
LOSS_AT_REFERENCE = {"sigmoid": math.log(2), "cdpo": math.log(2), "robust": math.log(2), "ipo": 25.0, "hinge": 1.0}


@pytest.mark.parametrize("loss", ["sigmoid", "cdpo", "ipo", "hinge", "robust"])
@pytest.mark.parametrize("reference", ["copy", "precomputed", "none"])
def test_losses_and_reference_modes_train(tmp_path, monkeypatch, loss, reference):
    """Every loss with every reference mode starts where its formula says and then trains: the
    first step sees the policy equal to its reference (rewards 0, the loss's value at h = 0; no
    reference: rewards are beta * the policy's log-probs), and the returned objective is the final
    eval loss of a policy that has moved."""
    from dpo_sweep.run import build_trainer, seed_everything

    monkeypatch.chdir(tmp_path)  # the reference cache goes under ./outputs/cache
    cfg = compose([f"loss={loss}", f"train.reference={reference}", "train.max_steps=3", "train.progress=false",
                   "tracking.enabled=false", "objective.metric=eval/loss", "objective.direction=minimize"])
    value = run_trial(cfg, out_dir=str(tmp_path / "run"))
    assert value == json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]["eval/loss"]
    seed_everything(cfg.seed)  # as run_trial does
    trainer, _ = build_trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    final = trainer.fit()
    first = trainer.history[0]
    assert final["eval/loss"] == pytest.approx(value, rel=1e-6)  # the same run, the same numbers
    if reference == "none":
        assert first["train/rewards/chosen"] == pytest.approx(0.1 * first["train/logps/chosen"], rel=1e-5)
        assert first["train/rewards/chosen"] < 0
    else:
        assert abs(first["train/rewards/chosen"]) < 1e-5 and abs(first["train/rewards/rejected"]) < 1e-5
        assert first["train/loss"] == pytest.approx(LOSS_AT_REFERENCE[loss], rel=1e-4)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.policy.named_parameters())


def test_precomputed_reference_matches_copy_and_reuses_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["train.max_steps=3", "train.progress=false", "tracking.enabled=false"]
    copy = json.loads(open(_run(tmp_path / "copy", base + ["train.reference=copy"])).read())["metrics"]
    pre = json.loads(open(_run(tmp_path / "pre", base + ["train.reference=precomputed"])).read())["metrics"]
    for key, value in copy.items():
        assert pre[key] == pytest.approx(value, abs=1e-5), key
    def reference_caches():
        return sorted(c.name for c in (tmp_path / "outputs" / "cache").glob("reflogps-*.safetensors"))

    caches = reference_caches()
    assert len(caches) == 1
    _run(tmp_path / "pre2", base + ["train.reference=precomputed", "beta=0.5"])  # same model and data: reused
    assert reference_caches() == caches
    _run(tmp_path / "pre3", base + ["train.reference=precomputed", "seed=1"])  # other weights: a new cache
    assert len(reference_caches()) == 2


def _run(out_dir, overrides):
    run_trial(compose(overrides), out_dir=str(out_dir))
    return os.path.join(out_dir, "metrics.json")


# ---------------------------------------------------------------------------- bad input


def test_unknown_key_and_wrong_type_fail_at_composition():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["train.bacth_size=4"])
    assert "bacth_size" in str(e.value.__cause__ or e.value)
    with pytest.raises(ConfigCompositionException) as e:
        compose(["beta=abc"])
    assert "beta" in str(e.value.__cause__ or e.value)


@pytest.mark.parametrize("override,key", [
    ("beta=0", "beta"), ("beta=-1", "beta"), ("optimizer.lr=-1e-3", "optimizer.lr"),
    ("loss.label_smoothing=0.5", "loss.label_smoothing"), ("train.batch_size=0", "train.batch_size"),
    ("train.max_prompt_length=600", "train.max_prompt_length"), ("loss.name=dpo", "loss.name"),
    ("train.reference=frozen", "train.reference"), ("optimizer.betas=[0.9]", "optimizer.betas"),
])
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        validate(compose([override]))


def test_unknown_objective_metric_is_named(tmp_path):
    cfg = compose(["train.max_steps=1", "train.progress=false", "tracking.enabled=false",
                   "objective.metric=eval/acc"])
    with pytest.raises(ConfigError, match="objective.metric"):
        run_trial(cfg, out_dir=str(tmp_path))


def test_cli_errors_are_clear(tmp_path):
    proc = run_cli("train.epochs=abc", f"hydra.run.dir={tmp_path}/a")
    assert proc.returncode != 0 and "train.epochs" in proc.stderr
    proc = run_cli("beta=-0.1", f"hydra.run.dir={tmp_path}/b", "tracking.enabled=false")
    assert proc.returncode != 0 and "config key 'beta' = -0.1: expected a finite number > 0" in proc.stderr
    missing = tmp_path / "missing.jsonl"
    proc = run_cli("dataset=local", f"dataset.path={missing}", f"hydra.run.dir={tmp_path}/c", "tracking.enabled=false")
    assert proc.returncode != 0 and f"data file '{missing}' does not exist" in proc.stderr
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3 + [{"prompt": "p"}])
    proc = run_cli("dataset=local", f"dataset.path={bad}", "dataset.eval_size=1", f"hydra.run.dir={tmp_path}/d",
                   "tracking.enabled=false")
    assert proc.returncode != 0 and f"{bad}: row 4: missing field 'chosen'" in proc.stderr


@pytest.mark.parametrize("option,loss_tol,norm_rel", [
    ("gradient_checkpointing", 1e-6, 1e-5),
    # torch.compile of the decoder (dynamic shapes), on the shared-prompt layout
    pytest.param("compile", 1e-5, 1e-4, marks=pytest.mark.slow),
])
def test_speed_options_give_the_same_steps(tmp_path, monkeypatch, option, loss_tol, norm_rel):
    from dpo_sweep.run import build_trainer

    monkeypatch.chdir(tmp_path)
    histories = []
    for on in ("false", "true"):
        cfg = compose(["train.max_steps=3", "train.progress=false", "tracking.enabled=false", f"train.{option}={on}"])
        trainer, _ = build_trainer(cfg)
        trainer.fit()
        histories.append(trainer.history)
    for a, b in zip(*histories):
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=loss_tol)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=norm_rel)


@pytest.mark.parametrize("reference", ["precomputed", "copy", "none"])
def test_shared_prompt_layout_gives_the_same_steps_as_two_rows_a_pair(tmp_path, monkeypatch, reference):
    """The same batches (no length grouping) through both layouts: the same run."""
    from dpo_sweep.data import collate_shared
    from dpo_sweep.run import build_trainer

    monkeypatch.chdir(tmp_path)
    runs = []
    for share in ("true", "false"):
        cfg = compose(["train.max_steps=4", "train.eval_every=2", "train.progress=false", "tracking.enabled=false",
                       "train.group_by_length=false", f"train.share_prompt={share}", f"train.reference={reference}"])
        trainer, _ = build_trainer(cfg)
        assert (trainer.collate is collate_shared) == (share == "true")
        runs.append((trainer.fit(), trainer.history))
    (final_a, steps_a), (final_b, steps_b) = runs
    for a, b in zip(steps_a, steps_b):
        for key in ("train/loss", "train/rewards/margins", "train/logps/chosen", "train/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key
    assert final_a == pytest.approx(final_b, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("override,why", [
    ("model.attn_implementation=eager", "attention is 'eager', not 'sdpa'"),
    ("model.config.model_type=gpt2", "model type 'gpt2' is not one of"),
])
def test_a_model_that_cannot_share_the_prompt_trains_two_rows_a_pair(tmp_path, monkeypatch, caplog, override, why):
    from dpo_sweep.data import collate
    from dpo_sweep.run import build_trainer

    monkeypatch.chdir(tmp_path)
    cfg = compose(["train.max_steps=2", "train.progress=false", "tracking.enabled=false", override])
    with caplog.at_level("INFO", logger="dpo_sweep.run"):
        trainer, _ = build_trainer(cfg)
    assert trainer.collate is collate
    assert trainer.sharing.requested and not trainer.sharing.layout and why in trainer.sharing.reason
    assert f"train.share_prompt: two rows a pair instead, because {why}" in caplog.text
    assert math.isfinite(trainer.fit()["eval/loss"])


class Crash(Exception):
    pass


def test_resume_from_checkpoint_gives_the_same_final_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["train.max_steps=8", "train.checkpoint_every=3", "train.eval_every=4", "train.progress=false",
            "tracking.enabled=false", "train.shuffle=true"]
    run_trial(compose(base), out_dir=str(tmp_path / "full"))
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())

    def crash_at_step_4(step, metrics):
        if step == 4:
            raise Crash

    with pytest.raises(Crash):
        run_trial(compose(base), out_dir=str(tmp_path / "cut"), on_eval=[crash_at_step_4])
    assert (tmp_path / "cut" / "checkpoint" / "checkpoint.pt").is_file()
    assert not (tmp_path / "cut" / "metrics.json").exists()
    run_trial(compose(base + ["train.resume=true"]), out_dir=str(tmp_path / "cut"))
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    for saved in (resumed, full):
        saved.pop("caches_built")  # what each run cost (the first built the caches), not what it reached
    assert resumed == full
    assert not (tmp_path / "cut" / "checkpoint").exists()  # removed once the run finished
