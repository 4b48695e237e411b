"""One training step of K LoRA trials packed over one frozen base model, against K steps of one
adapter each (K trials one after another), on a model of phi-2's shape with random weights.

    python experiments/packing/gpu_bench.py --out gpu.md                               # a GPU
    python experiments/packing/gpu_bench.py --device cpu --layers 2 --hidden 256        # smoke test

No network and no data: the model is built from a config (phi: hidden 2560, 32 layers, 32 heads,
intermediate 10240, vocabulary 51200, partial rotary factor 0.4), bf16 weights on CUDA (fp32 on
CPU), LoRA r=16, alpha 32, all linear layers (`dpo_sweep.models.apply_lora`). A batch is B
sequences of T random token ids; the loss is minus the mean summed log-prob of the second half of
each sequence (`dpo_sweep.logprobs.sequence_logps`). A step is forward, backward and AdamW.

- packed K: `dpo_sweep.packing.lora.add_lanes` gives the model K adapters; one forward of K
  copies of the batch (K * B rows) inside `Router.route`, block j through adapter j; the sum of
  the K lanes' losses backpropagated once; each lane's own AdamW steps (as the packed trainer).
- sequential: one adapter, PEFT's own forward, one step on B rows; K trials cost K such steps.

Each configuration builds its model afresh (same seed); warmup steps, then the median of the
timed steps, synchronised around each; the peak of `torch.cuda.max_memory_allocated()` over the
configuration (weights, adapters, optimizer states, activations).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import torch
from omegaconf import OmegaConf


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=2560)
    p.add_argument("--heads", type=int, default=None,
                   help="default: heads of 80 dims as phi-2 (32 at hidden 2560), else of 32 dims (the rotary "
                        "dims, 0.4 of a head, must be even)")
    p.add_argument("--intermediate", type=int, default=None, help="default: 4 x hidden (phi-2: 10240)")
    p.add_argument("--vocab", type=int, default=51200)
    p.add_argument("--ks", default="1,2,4,8", help="trials packed")
    p.add_argument("--batch", type=int, default=4, help="B: sequences per trial per step")
    p.add_argument("--seq", type=int, default=None, help="T: tokens per sequence (default 512; 128 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, median (default 10; 2 on CPU)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", help="also write the table (markdown) to this file")
    return p.parse_args()


def build(a, device: torch.device):
    """The base model (random weights of the given shape, seed 0) wrapped with one LoRA adapter."""
    from transformers import AutoModelForCausalLM, PhiConfig

    from dpo_sweep.models import apply_lora, disable_dropout

    config = PhiConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate or 4 * a.hidden,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                       partial_rotary_factor=0.4, max_position_embeddings=2048, tie_word_embeddings=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    disable_dropout(model)
    lora = OmegaConf.create({"r": a.rank, "alpha": 2 * a.rank, "dropout": 0.0, "target_modules": "all-linear"})
    torch.manual_seed(0)
    model = apply_lora(model, lora).to(device)
    model.train()
    return model, lora


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


def measure(a, device: torch.device, k: int | None) -> dict:
    """ms per step (median) and peak GiB: k trials packed, or (k None) one adapter, PEFT's forward."""
    from dpo_sweep.logprobs import sequence_logps
    from dpo_sweep.packing.lora import add_lanes, lane_name, lane_parameters

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, lora = build(a, device)
    lanes = k or 1
    names = [lane_name(j) for j in range(lanes)]
    router = add_lanes(model, [lora] * lanes, seed=0) if k else None
    optimizers = [torch.optim.AdamW(lane_parameters(model, [n]), lr=1e-4) for n in names]
    build_s = time.perf_counter() - t0

    g = torch.Generator().manual_seed(0)
    B, T = a.batch, a.seq
    ids = torch.randint(0, a.vocab, (B, T), generator=g).to(device)  # (B, T)
    ids = ids.repeat(lanes, 1)  # (K*B, T): the same batch for every lane, as in a packed sweep
    mask = torch.ones_like(ids)
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[:, T // 2 :] = True  # the "response": second half

    def step() -> None:
        with autocast(device):
            if router is not None:
                with router.route(names):
                    logps, _ = sequence_logps(model, ids, mask, loss_mask)  # (K*B,)
            else:
                logps, _ = sequence_logps(model, ids, mask, loss_mask)  # (B,)
            loss = -sum(part.mean() for part in logps.split(B))  # each lane's loss on its own rows
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    times = []
    for i in range(a.warmup + a.steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        if i >= a.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    trainable = sum(p.numel() for opt in optimizers for grp in opt.param_groups for p in grp["params"])
    return {"ms": statistics.median(times) * 1000, "peak_gib": peak, "build_s": build_s, "trainable": trainable}


def gib(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def main() -> None:
    a = parse_args()
    a.heads = a.heads or (a.hidden // 80 if a.hidden % 80 == 0 else a.hidden // 32)
    device = torch.device(a.device)
    cpu = device.type == "cpu"  # a smoke test: shorter sequences, fewer steps
    a.seq = a.seq or (128 if cpu else 512)
    a.warmup = (1 if cpu else 3) if a.warmup is None else a.warmup
    a.steps = a.steps or (2 if cpu else 10)
    ks = [int(k) for k in a.ks.split(",")]
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    inter = a.intermediate or 4 * a.hidden
    header = (f"{name}; torch {torch.__version__}; phi model of hidden {a.hidden}, {a.layers} layers, {a.heads} heads, "
              f"intermediate {inter}, vocabulary {a.vocab}, {'bf16' if device.type == 'cuda' else 'fp32'} weights"
              f"{' + bf16 autocast' if device.type == 'cuda' else ''}; LoRA r={a.rank}, alpha {2 * a.rank}, all-linear; "
              f"B={a.batch} sequences of T={a.seq} random tokens a trial; median of {a.steps} steps after {a.warmup}")
    print(header, flush=True)
    one = measure(a, device, None)
    print(f"  one adapter (PEFT forward): {one['ms']:.1f} ms/step, peak {gib(one['peak_gib'])} GiB, "
          f"{one['trainable'] / 1e6:.1f}M trainable, built in {one['build_s']:.1f} s", flush=True)
    rows = []
    for k in ks:
        r = measure(a, device, k)
        rows.append((k, r))
        print(f"  packed K={k}: {r['ms']:.1f} ms/step, peak {gib(r['peak_gib'])} GiB, built in {r['build_s']:.1f} s",
              flush=True)
    lines = [header + ".", "",
             ("| K | packed ms/step | sequential ms/step (K single-adapter steps) | speedup | packed peak GiB "
              "| one-trial peak GiB |"),
             "| --- | --- | --- | --- | --- | --- |"]
    for k, r in rows:
        seq = k * one["ms"]
        lines.append(f"| {k} | {r['ms']:.1f} | {seq:.1f} | {seq / r['ms']:.2f} | {gib(r['peak_gib'])} "
                     f"| {gib(one['peak_gib'])} |")
    lines += ["", f"Total wall time of the script: {time.perf_counter() - start:.0f} s."]
    text = "\n".join(lines)
    print("\n" + text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
