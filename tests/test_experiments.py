"""Every conf/experiment/*.yaml composes with the real configs, validates, and trains shrunk to a
few steps as a single run; its sweep parameters parse as Hydra sweep overrides of real keys."""

import json
import math
import os

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from conftest import REPO, compose, write_jsonl
from dpo_sweep.config import register, validate
from dpo_sweep.models import load_policy, load_tokenizer
from dpo_sweep.paths import conf_dir
from dpo_sweep.run import run_trial

EXPERIMENTS = sorted(f[: -len(".yaml")] for f in os.listdir(os.path.join(conf_dir(), "experiment")))
QUICK = ["train.max_steps=3", "train.progress=false", "tracking.enabled=false"]
# phi-2's architecture (model_type phi: partial rotary, parallel attention/MLP, untied head) at a
# size that trains in a second, with the built-in char tokenizer (phi-2 itself is 2.7B, on the hub).
TINY_PHI = dict(model_type="phi", hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                partial_rotary_factor=0.4, max_position_embeddings=1024, tie_word_embeddings=False)


def truthy_like_rows(n):
    """Rows shaped like jondurbin/truthy-dpo-v0.1: system, prompt, chosen, rejected."""
    rows = []
    for i in range(n):
        rows.append({
            "system": "You are an unbiased, honest, helpful AI assistant.",
            "prompt": f"Is it true that goldfish have a {i}-second memory?",
            "chosen": "No. Goldfish remember things for months; the short memory is a myth.",
            "rejected": f"Yes, a goldfish forgets everything after {i} seconds.",
        })
    return rows


def shrink(name, tmp_path):
    """Overrides that make experiment `name` a run of a few steps on CPU with local stand-ins."""
    if name == "tiny_sweep":
        return QUICK + ["dataset.builtin_size=60", "dataset.eval_size=10"]
    if name == "phi2_truthy":
        data = write_jsonl(tmp_path / "truthy.jsonl", truthy_like_rows(24))
        arch = ",".join(f"{k}:{str(v).lower() if isinstance(v, bool) else v}" for k, v in TINY_PHI.items())
        return QUICK + ["model.name_or_path=null", f"+model.config={{{arch}}}", f"dataset.path={data}",
                        "train.save_model=true"]
    raise AssertionError(f"conf/experiment/{name}.yaml has no shrunk test run: add it to shrink()")


def hydra_node(name):
    """The `hydra` node of the composed experiment (the sweeper's settings live there)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[f"+experiment={name}"], return_hydra_config=True)


def test_every_preset_is_a_documented_experiment():
    """Each conf/experiment/<name>.yaml has experiments/<name>/README.md, which gives the preset's
    launch command (the yaml's second line); the two presets the README promises are there."""
    assert {"tiny_sweep", "phi2_truthy"} <= set(EXPERIMENTS)
    for name in EXPERIMENTS:
        with open(os.path.join(conf_dir(), "experiment", f"{name}.yaml")) as f:
            launch = f.readlines()[1].lstrip("# ").strip()
        readme = os.path.join(REPO, "experiments", name, "README.md")
        assert os.path.isfile(readme), f"conf/experiment/{name}.yaml has no experiments/{name}/README.md"
        assert launch.split(" -m")[0] in open(readme).read(), f"experiments/{name}/README.md lacks `{launch}`"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_header_is_package_global_then_launch_command(name):
    with open(os.path.join(conf_dir(), "experiment", f"{name}.yaml")) as f:
        first, second = f.readline().strip(), f.readline().strip()
    assert first == "# @package _global_"  # Hydra reads the header only before any other comment
    assert second.startswith(f"# python -m dpo_sweep +experiment={name}")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_sweep_params_are_sweeps_over_real_keys(name):
    cfg = hydra_node(name)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("DPOOptunaSweeper")
    assert sweeper.n_trials is None or sweeper.n_trials >= 1  # None: the full grid
    params = OmegaConf.to_container(sweeper.params)
    assert {"beta", "optimizer.lr"} <= set(params)
    for override in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]):
        assert override.is_sweep_override(), override.input_line
        assert OmegaConf.select(cfg, override.get_key_element()) is not None, override.input_line


def test_tiny_sweep_preset_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a precomputed reference caches under ./outputs/cache
    cfg = compose(["+experiment=tiny_sweep"] + shrink("tiny_sweep", tmp_path))
    assert cfg.tracking.experiment == "tiny-sweep" and cfg.train.eval_every == 16
    assert cfg.model.config.model_type == "llama" and cfg.dataset.name == "builtin"  # the embedded default
    objective = run_trial(cfg, out_dir=str(tmp_path / "run"))
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert result["objective"] == objective and 0.0 <= objective <= 1.0


def test_phi2_truthy_preset_composes_as_written():
    cfg = compose(["+experiment=phi2_truthy"])
    validate(cfg)
    assert cfg.model.name_or_path == "microsoft/phi-2" and cfg.model.dtype == "float32"
    assert cfg.dataset.name == "jondurbin/truthy-dpo-v0.1"
    assert cfg.beta == 0.1 and cfg.optimizer.lr == 1e-6
    assert cfg.train.batch_size == 4 and cfg.train.max_length == 512 and cfg.train.reference == "precomputed"


def test_phi2_truthy_preset_trains_a_tiny_phi(tmp_path, monkeypatch):
    """The preset's settings train the phi architecture: the reference log-probs are precomputed
    from the policy's initial weights (so the loss starts at ln 2 and, at lr 1e-6, stays there),
    and every parameter of the saved model moved from those weights by a few steps of that lr."""
    monkeypatch.chdir(tmp_path)  # the precomputed reference caches under ./outputs/cache
    cfg = compose(["+experiment=phi2_truthy"] + shrink("phi2_truthy", tmp_path))
    assert dict(cfg.model.config) == TINY_PHI
    run_trial(cfg, out_dir=str(tmp_path / "run"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    # policy == reference at step 0 gives loss ln 2; 3 steps of lr 1e-6 move it by ~1e-3
    assert abs(metrics["train/loss"] - math.log(2)) < 1e-2 and abs(metrics["eval/loss"] - math.log(2)) < 1e-2
    assert abs(metrics["eval/rewards/chosen"]) < 1e-2 and abs(metrics["eval/rewards/rejected"]) < 1e-2
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["model_type"] == "phi" and saved["rope_parameters"]["partial_rotary_factor"] == 0.4
    cached = list((tmp_path / "outputs" / "cache").glob("reflogps-*.safetensors"))
    assert len(cached) == 1  # the reference was precomputed
    initial = load_policy(cfg.model, load_tokenizer(cfg.model), cfg.seed)  # same seed: same weights
    trained = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").named_parameters())
    for name, before in initial.named_parameters():
        moved = (trained[name] - before).abs().max().item()
        assert 0 < moved < 2 * cfg.train.max_steps * cfg.optimizer.lr, (name, moved)  # Adam: ~lr a step
