"""Our trainer against TRL's DPOTrainer on the same model, data and settings, side by side.

    python experiments/bench_vs_trl/bench.py                 # CPU here, CUDA where there is a GPU
    python experiments/bench_vs_trl/bench.py --repeats 3 --sweep
    python experiments/bench_vs_trl/bench.py --model phi2-shape --pairs 264 --max-length 512   # GPU

Each measurement runs in its own child process (so peak memory is that run's alone); ours and
TRL's alternate. One epoch, constant lr, no warmup, no shuffle, same batch; fp32 on CPU, bf16 on
CUDA. Prints a table of pairs/s, tokens/s, model FLOPs utilisation, peak memory (RSS on CPU, max
allocated on CUDA), final loss, and the ratios ours/TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)

WORDS = ("the a of and to in is it that was for on are as with his they at be this from have or by one had "
         "not but what all were when we there can an your which their said if do will each about how up out "
         "them then she many some so these would other into has more her two like him see time could no make "
         "than first been its who now people my made over did down only way find use may water long little").split()

MODELS = {
    # ~5.3M parameters with the 100-token char vocabulary.
    "tiny-5m": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                    num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                    tie_word_embeddings=True),
    # phi-2's shape (2.7B): for a GPU.
    "phi2-shape": dict(model_type="phi", hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, partial_rotary_factor=0.4,
                       max_position_embeddings=2048, vocab_size=51200, tie_word_embeddings=False),
}


def sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def make_rows(n: int, max_chars: int, seed: int = 0) -> list[dict]:
    """Pairs with long-tailed lengths, as real preference data has."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = lambda lo, hi: max(1, min(int(rng.lognormvariate(0, 0.8) * lo), hi))  # noqa: E731
        rows.append({
            "prompt": sentence(rng, words(8, max_chars // 12)) + "\n",
            "chosen": " " + sentence(rng, words(12, max_chars // 8)),
            "rejected": " " + sentence(rng, words(12, max_chars // 8)),
        })
    return rows


def setup(workdir: str, model: str, pairs: int, max_length: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpo_sweep.models import char_tokenizer

    tok = char_tokenizer()
    arch = dict(MODELS[model])
    model_type = arch.pop("model_type")
    arch.setdefault("vocab_size", len(tok))
    arch.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **arch))
    model_dir = os.path.join(workdir, "model")
    m.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = make_rows(pairs, max_length)
    data = os.path.join(workdir, "train.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    n_params = sum(p.numel() for p in m.parameters())
    # Parameters in matrix products: all but an input embedding that is not also the output head.
    lookup = 0 if m.config.tie_word_embeddings else m.get_input_embeddings().weight.numel()
    return {"model_dir": model_dir, "data": data, "n_params": n_params, "matmul_params": n_params - lookup}


def real_tokens(rows_pairs) -> int:
    """Tokens of prompt+chosen and prompt+rejected: the work both trainers must do."""
    return sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in rows_pairs)


def unique_tokens(rows_pairs) -> int:
    """Tokens of prompt + chosen + rejected, each prompt once: the basis of model FLOPs."""
    return sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in rows_pairs)


# Dense bf16 peak of known GPUs, in TFLOP/s (vendor figures, without sparsity).
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def peak_flops() -> tuple[float, str]:
    """(FLOP/s, where the figure comes from): a GPU's dense bf16 peak from its name, else the best
    of 6 timed square matmuls (bf16 8192 on CUDA, fp32 2048 on CPU), the most this machine's
    matmul library reaches."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name}: dense bf16 peak {tflops:g} TFLOP/s"
    cuda = torch.cuda.is_available()
    n, dtype, device = (8192, torch.bfloat16, "cuda") if cuda else (2048, torch.float32, "cpu")
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(6):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best, f"best of a timed {n}-cube {str(dtype)[6:]} matmul on {device}"


# ---------------------------------------------------------------------------- workers


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_ours(a, betas) -> dict:
    from hydra import compose, initialize_config_dir

    from dpo_sweep.config import register
    from dpo_sweep.paths import conf_dir
    from dpo_sweep.run import build_trainer

    register()
    results = []
    start_all = time.perf_counter()
    for beta in betas:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = compose("config", overrides=[
                f"model.name_or_path={a.model_dir}", "dataset=local", f"dataset.path={a.data}", "dataset.eval_size=8",
                f"beta={beta}", "optimizer.lr=1e-4", f"train.batch_size={a.batch_size}", "train.epochs=1",
                f"train.max_length={a.max_length}", f"train.max_prompt_length={a.max_length // 2}",
                "train.lr_schedule=constant", "train.warmup_ratio=0", "train.shuffle=false", "train.progress=false",
                f"train.reference={a.reference}", f"train.group_by_length={a.group_by_length}",
                "tracking.enabled=false",
            ])
        t0 = time.perf_counter()
        trainer, _ = build_trainer(cfg, cwd=a.workdir)  # precomputed reference: computed (or read) here
        t1 = time.perf_counter()
        steps = trainer.total_steps
        trainer.fit()  # one epoch, then an eval of the 8 held-out pairs
        last = trainer.history[-1]
        if trainer.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        t2 = time.perf_counter()
        results.append({"setup_s": t1 - t0, "train_s": t2 - t1, "final_loss": last["train/loss"],
                        "pairs": steps * a.batch_size, "tokens": real_tokens(trainer.train_pairs[: steps * a.batch_size]),
                        "unique_tokens": unique_tokens(trainer.train_pairs[: steps * a.batch_size]),
                        "device": str(trainer.device), "shared_prompt": trainer.sharing.layout,
                        "shared_prompt_reason": trainer.sharing.reason})
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"runs": results, "total_s": time.perf_counter() - start_all, "peak_mb": peak_memory_mb(device)}


def worker_trl(a, betas) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    cuda = torch.cuda.is_available()
    rows = [json.loads(line) for line in open(a.data)][:-8]  # the same 8 eval rows are held out
    results = []
    start_all = time.perf_counter()
    for beta in betas:
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(a.model_dir)
        model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
        args = DPOConfig(
            output_dir=os.path.join(a.workdir, "trl-out"), num_train_epochs=1, per_device_train_batch_size=a.batch_size,
            learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, beta=beta, logging_steps=1,
            report_to="none", save_strategy="no", bf16=cuda, use_cpu=not cuda, gradient_checkpointing=False,
            train_sampling_strategy="sequential", seed=0, disable_tqdm=True, optim="adamw_torch",
            max_length=a.max_length, dataloader_drop_last=True,
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        t1 = time.perf_counter()
        out = trainer.train()
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        n_pairs = out.global_step * a.batch_size
        ds = trainer.train_dataset
        sizes = [(len(ds[i]["prompt_ids"]), len(ds[i]["chosen_ids"]) + len(ds[i]["rejected_ids"])) for i in range(n_pairs)]
        results.append({"setup_s": t1 - t0, "train_s": t2 - t1, "final_loss": losses[-1], "pairs": n_pairs,
                        "tokens": sum(2 * p + r for p, r in sizes), "unique_tokens": sum(p + r for p, r in sizes),
                        "device": "cuda" if cuda else "cpu"})
    device = torch.device("cuda" if cuda else "cpu")
    return {"runs": results, "total_s": time.perf_counter() - start_all, "peak_mb": peak_memory_mb(device)}


# ---------------------------------------------------------------------------- driver


def run_child(who: str, a, betas) -> dict:
    cmd = [sys.executable, __file__, "--worker", who, "--workdir", a.workdir, "--model-dir", a.model_dir,
           "--data", a.data, "--batch-size", str(a.batch_size), "--max-length", str(a.max_length),
           "--reference", a.reference, "--group-by-length", str(a.group_by_length),
           "--betas", ",".join(map(str, betas))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{who} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-5m", choices=sorted(MODELS))
    p.add_argument("--pairs", type=int, default=520, help="train pairs + 8 held out")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--reference", default="precomputed", help="ours: copy | precomputed | none")
    p.add_argument("--group-by-length", default="true")
    p.add_argument("--sweep", action="store_true", help="also time a 4-trial beta sweep for each")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--betas", default="0.1", help=argparse.SUPPRESS)
    return p.parse_args()


def clear_cache(workdir: str) -> None:
    """Remove our precomputed reference log-probs, so that the next run computes them again."""
    from dpo_sweep.paths import cache_dir

    cache = cache_dir(workdir)
    for f in os.listdir(cache) if os.path.isdir(cache) else []:
        os.remove(os.path.join(cache, f))


def main() -> None:
    a = parse_args()
    if a.worker:
        betas = [float(b) for b in a.betas.split(",")]
        out = worker_ours(a, betas) if a.worker == "ours" else worker_trl(a, betas)
        print(json.dumps(out))
        return

    a.workdir = tempfile.mkdtemp(prefix="bench-")
    info = setup(a.workdir, a.model, a.pairs, a.max_length)
    a.model_dir, a.data = info["model_dir"], info["data"]
    print(f"model {a.model}: {info['n_params'] / 1e6:.1f}M parameters; {a.pairs - 8} train pairs, batch {a.batch_size}, "
          f"max_length {a.max_length}; ours: reference={a.reference}, group_by_length={a.group_by_length}")
    peak, source = peak_flops()
    print(f"peak for MFU: {peak / 1e12:.3g} TFLOP/s ({source}); model FLOPs = 6 x {info['matmul_params'] / 1e6:.1f}M "
          f"matmul parameters x (prompt + chosen + rejected tokens)")
    rows = {"ours": [], "trl": []}
    for r in range(a.repeats):
        for who in ("ours", "trl"):
            if who == "ours" and a.reference == "precomputed":  # each repeat starts without a cache
                clear_cache(a.workdir)
            rows[who].append(run_child(who, a, [0.1]))
            one = rows[who][-1]["runs"][0]
            print(f"  repeat {r + 1} {who:4s}: {one['pairs'] / one['train_s']:.1f} pairs/s, "
                  f"{one['tokens'] / one['train_s']:.0f} tokens/s, setup {one['setup_s']:.1f}s, "
                  f"peak {rows[who][-1]['peak_mb']:.0f} MB, final loss {one['final_loss']:.4f}", flush=True)
    table(rows, a, 6 * info["matmul_params"] / peak)
    if a.sweep:
        betas = [0.05, 0.1, 0.2, 0.5]
        clear_cache(a.workdir)
        ours = run_child("ours", a, betas)
        theirs = run_child("trl", a, betas)
        print(f"\n4-trial beta sweep {betas}, wall time of the whole sweep (setup included):")
        print(f"  ours {ours['total_s']:.1f} s, TRL {theirs['total_s']:.1f} s, ratio ours/TRL "
              f"{ours['total_s'] / theirs['total_s']:.2f}")


def table(rows: dict, a, peak_s_per_token: float) -> None:
    """`peak_s_per_token`: seconds per unique token at the peak (model FLOPs per token / peak)."""
    def med(who, f):
        return statistics.median(f(r) for r in rows[who])

    metrics = {
        "pairs/s": lambda r: r["runs"][0]["pairs"] / r["runs"][0]["train_s"],
        "tokens/s": lambda r: r["runs"][0]["tokens"] / r["runs"][0]["train_s"],
        "MFU": lambda r: r["runs"][0]["unique_tokens"] * peak_s_per_token / r["runs"][0]["train_s"],
        "epoch s (incl. setup)": lambda r: r["runs"][0]["train_s"] + r["runs"][0]["setup_s"],
        "peak MB": lambda r: r["peak_mb"],
        "final loss": lambda r: r["runs"][0]["final_loss"],
    }
    first = rows["ours"][0]["runs"][0]
    device = first["device"]
    sharing = "one row per pair" if first["shared_prompt"] else f"two rows a pair ({first['shared_prompt_reason']})"
    print(f"\nmedian of {a.repeats} on {device}; ours: {sharing}:")
    print(f"| {'metric':22s} | {'ours':>10s} | {'TRL':>10s} | {'ours/TRL':>8s} |")
    print(f"|{'-' * 24}|{'-' * 12}|{'-' * 12}|{'-' * 10}|")
    for name, f in metrics.items():
        x, y = med("ours", f), med("trl", f)
        print(f"| {name:22s} | {x:10.4g} | {y:10.4g} | {x / y:8.2f} |")


if __name__ == "__main__":
    main()
