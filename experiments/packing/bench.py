"""Packed LoRA trials against one process a trial: the same 4-trial sweep three ways, timed.

    python experiments/packing/bench.py                       # one round of the three modes
    python experiments/packing/bench.py --repeats 3 --out experiments/packing/results.md

The bench model and data of experiments/bench_vs_trl (its `setup`: a 4.8M-parameter Llama with
random weights, saved with the character tokenizer; pairs with long-tailed lengths as jsonl),
and a LoRA sweep over beta (0.05, 0.1, 0.3, 0.5), each trial `train.max_steps` optimizer steps,
run as `python -m dpo_sweep ... -m` in a subprocess, three ways:

- packed:     hydra.sweeper.pack=4: one process trains the four trials over one base model;
- sequential: one trial after another in the sweeper's process (basic launcher);
- parallel:   hydra/launcher=joblib hydra.launcher.n_jobs=4 hydra.sweeper.n_jobs=4.

Every sweep starts in the same folder, whose reference caches (outputs/cache/) one short lone run
builds before anything is timed, so no mode builds them. Each mode has its own sweep folder and
MLflow store, and the same environment. Measured per sweep: the wall time of the subprocess (its
whole life), and the peak over samples (every 0.1 s) of the RSS summed over the sweep's process
and all its descendants; also the CPU time the rest of the machine took meanwhile (in cores: a
noise gauge), each trial's objective, whether packed and sequential trials end with the same
eval/loss (within 1e-5), and where the time goes (from the jobs' logs and the MLflow metrics'
timestamps). Modes alternate in rounds (`--repeats`, the order rotated); the table has medians.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import itertools
import json
import os
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

MODES = ("packed", "sequential", "parallel")
MODE_ARGS = {
    "packed": ["hydra.sweeper.pack=4"],
    "sequential": [],
    "parallel": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=4", "hydra.sweeper.n_jobs=4"],
}
BETAS = (0.05, 0.1, 0.3, 0.5)
EVAL_PAIRS = 16
# The same environment for every mode: the user's, offline, no tokenizer threads.
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[^\]]+\]\[\w+\] - (.*)$")


def bench_vs_trl():
    """experiments/bench_vs_trl/bench.py as a module: its `setup` builds the bench model and data."""
    spec = importlib.util.spec_from_file_location("bench_vs_trl", os.path.join(REPO, "experiments", "bench_vs_trl",
                                                                               "bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def common_args(a) -> list[str]:
    """The sweep's (and the warm-up run's) settings, but the grid."""
    return [
        "model.lora.enabled=true", f"model.name_or_path={a.model_dir}",
        "dataset=local", f"dataset.path={a.data}", f"dataset.eval_size={EVAL_PAIRS}",
        f"train.max_steps={a.steps}", "train.progress=false",
    ]


# ---------------------------------------------------------------------------- memory


class TreeSampler(threading.Thread):
    """Every `period` s, the RSS summed over process `pid` and all its descendants; keeps the max.
    Also notes the most processes seen at once and the OMP_NUM_THREADS of each."""

    def __init__(self, pid: int, period: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak, self.samples, self.most = 0, 0, 0
        self.omp: dict[int, str] = {}  # descendants' OMP_NUM_THREADS
        self._done = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total, alive = 0, 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                    alive += 1
                    if p.pid not in self.omp and p.pid != self.pid:
                        self.omp[p.pid] = p.environ().get("OMP_NUM_THREADS", "unset")
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            self.peak, self.most = max(self.peak, total), max(self.most, alive)
            self.samples += 1
            self._done.wait(self.period)

    def stop(self) -> None:
        self._done.set()
        self.join()


# ---------------------------------------------------------------------------- one sweep


def run_sweep(a, mode: str, folder: str) -> dict:
    """One sweep in `mode` into `folder` (its sweep folder and MLflow store), started in a.workdir."""
    os.makedirs(folder)
    sweep_dir = os.path.join(folder, "sweep")
    store = os.path.join(folder, "mlflow.db")
    cmd = [sys.executable, "-m", "dpo_sweep", *common_args(a), "beta=" + ",".join(map(str, BETAS)),
           *MODE_ARGS[mode], f"hydra.sweep.dir={sweep_dir}", f"tracking.uri=sqlite:///{store}", "-m"]
    console = os.path.join(folder, "console.log")
    cpu0, own0 = busy_cpu_s(), children_cpu_s()
    with open(console, "w") as out:
        start_clock, start = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=a.workdir, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - start
        sampler.stop()
    # CPU time spent outside the sweep while it ran (other programs, the sampler), in cores
    other = max(0.0, (busy_cpu_s() - cpu0) - (children_cpu_s() - own0)) / wall
    if rc != 0:
        with open(console) as f:
            raise RuntimeError(f"{mode} sweep failed (exit {rc}):\n" + f.read()[-4000:])
    trials = read_trials(sweep_dir, store)
    if len(trials) != len(BETAS):
        raise RuntimeError(f"{mode}: {len(trials)} finished trials in {sweep_dir}, expected {len(BETAS)}")
    return {"mode": mode, "wall": wall, "peak_mb": sampler.peak / 2**20, "procs": sampler.most,
            "samples": sampler.samples, "other_cores": other, "omp": sorted(set(sampler.omp.values())), "trials": trials,
            "phases": phases(trials, start_clock, wall), "folder": folder}


def busy_cpu_s() -> float:
    """CPU seconds this machine has been busy (all cores, all processes), since boot."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def children_cpu_s() -> float:
    """CPU seconds of this script's finished child processes (and theirs that they waited for)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def read_trials(sweep_dir: str, store: str) -> list[dict]:
    """Each finished trial: beta, objective, final eval/loss, caches it built, and the times of its
    job's log lines (from `__main__.log` in the folder of the job that trained it) and of its last
    logged train metrics (MLflow)."""
    import yaml

    last_train = train_end_times(store)
    trials = []
    for name in sorted((n for n in os.listdir(sweep_dir) if n.isdigit()), key=int):
        folder = os.path.join(sweep_dir, name)
        metrics_path = os.path.join(folder, "metrics.json")
        if not os.path.exists(metrics_path):
            continue
        with open(metrics_path) as f:
            result = json.load(f)
        with open(os.path.join(folder, ".hydra", "config.yaml")) as f:
            beta = yaml.safe_load(f)["beta"]
        log_path = os.path.join(folder, "__main__.log")  # a pack's members have none: the leader's job logs
        trials.append({"number": int(name), "beta": float(beta), "objective": result["objective"],
                       "objective_metric": result["objective_metric"],
                       "eval_loss": result["metrics"]["eval/loss"], "built": result.get("caches_built", []),
                       "log": log_times(log_path) if os.path.exists(log_path) else None,
                       "train_end": last_train.get(os.path.abspath(folder))})
    return trials


def train_end_times(store: str) -> dict[str, float]:
    """{run folder: time (s since the epoch) of its run's last train/loss}, from the MLflow store."""
    con = sqlite3.connect(store)
    try:
        rows = con.execute(
            "SELECT t.value, MAX(m.timestamp) FROM metrics m JOIN tags t ON t.run_uuid = m.run_uuid "
            "WHERE m.key = 'train/loss' AND t.key = 'run_dir' GROUP BY t.value").fetchall()
    finally:
        con.close()
    return {os.path.abspath(folder): ms / 1000 for folder, ms in rows}


def log_times(path: str) -> dict[str, float]:
    """Times (s since the epoch) of a job's milestones from its log: `data` (read and tokenised),
    `train_start` (model loaded, reference caches read; a pack: its adapters added), `eval_end`
    (the last final eval logged)."""
    out: dict[str, float] = {}
    with open(path) as f:
        for line in f:
            m = LOG_LINE.match(line.rstrip("\n"))
            if not m:
                continue
            t = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            text = m.group(2)
            if text.startswith("data:") and "data" not in out:
                out["data"] = t
            elif text.startswith(("reference log-probs from cache", "reference samples from cache",
                                  "reference log-probs cached", "reference samples cached", "pack of ")):
                out["train_start"] = t  # the last of these before training
            elif "final eval:" in text:
                out["eval_end"] = t
    return out


def phases(trials: list[dict], start: float, wall: float) -> dict[str, float]:
    """Where a sweep's wall time goes, summed over its jobs (one job a trial, or one a pack, whose
    log every member's folder holds): start-up (process start to the first job's data read and
    tokenised), model and caches (data to training start), training (to the job's last train
    step), final eval (to its last final eval), and the rest (results to disk and MLflow, the
    sweeper between and after the jobs, exit). Where jobs overlap (parallel) the sums exceed the
    wall time, and the rest is None."""
    jobs: dict[tuple, list[dict]] = {}
    for t in trials:
        if not t["log"] or any(k not in t["log"] for k in ("data", "train_start", "eval_end")) or not t["train_end"]:
            return {}
        jobs.setdefault(tuple(sorted(t["log"].items())), []).append(t)
    out = {"start-up": min(t["log"]["data"] for t in trials) - start, "model + caches": 0.0, "training": 0.0,
           "final eval": 0.0}
    for members in jobs.values():
        log, train_end = members[0]["log"], max(t["train_end"] for t in members)
        out["model + caches"] += log["train_start"] - log["data"]
        out["training"] += train_end - log["train_start"]
        out["final eval"] += log["eval_end"] - train_end
    spans = sorted((m[0]["log"]["data"], m[0]["log"]["eval_end"]) for m in jobs.values())
    serial = all(b[0] >= a[1] for a, b in itertools.pairwise(spans))
    out["rest"] = wall - sum(out.values()) if serial else None
    out["jobs"] = len(jobs)
    return out


# ---------------------------------------------------------------------------- driver


def warm_caches(a) -> float:
    """One lone 1-step run in a.workdir: it computes the reference log-probs and the reference
    samples into outputs/cache/, which every timed trial then reads. Its wall time."""
    folder = os.path.join(a.workdir, "warm")
    cmd = [sys.executable, "-m", "dpo_sweep", *[x for x in common_args(a) if not x.startswith("train.max_steps")],
           "train.max_steps=1", f"hydra.run.dir={folder}", f"tracking.uri=sqlite:///{folder}/mlflow.db"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=a.workdir, env=ENV, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError("the warm-up run failed:\n" + (proc.stdout + proc.stderr)[-4000:])
    return time.perf_counter() - start


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=1, help="rounds of the three modes (order rotated each round)")
    p.add_argument("--steps", type=int, default=40, help="train.max_steps of each trial, 8 pairs a step (64: one epoch)")
    p.add_argument("--pairs", type=int, default=528, help="pairs in the data set, the last 16 held out for eval")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--out", help="also write the table (markdown) to this file")
    p.add_argument("--workdir", help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (sweep folders, logs, stores)")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    modes = [m for m in a.modes.split(",") if m]
    assert all(m in MODES for m in modes), modes
    import torch

    own = a.workdir is None
    a.workdir = os.path.abspath(a.workdir or tempfile.mkdtemp(prefix="packing-bench-"))
    os.makedirs(a.workdir, exist_ok=True)
    try:
        info = bench_vs_trl().setup(a.workdir, "tiny-5m", a.pairs, a.max_length)
        a.model_dir, a.data = info["model_dir"], info["data"]
        header = (f"bench model: {info['n_params'] / 1e6:.1f}M-parameter Llama, LoRA r=16 all-linear; "
                  f"{a.pairs - EVAL_PAIRS} train pairs + {EVAL_PAIRS} eval pairs, max_length {a.max_length}; "
                  f"{len(BETAS)} trials (beta {', '.join(map(str, BETAS))}), {a.steps} steps of 8 pairs each; "
                  f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads by "
                  f"default; the same environment for every mode (OMP_NUM_THREADS="
                  f"{ENV.get('OMP_NUM_THREADS', 'unset')}, HF_HUB_OFFLINE=1, TOKENIZERS_PARALLELISM=false)")
        print(header, flush=True)
        print(f"warming the reference caches (one lone 1-step run): {warm_caches(a):.1f} s, not counted", flush=True)
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(a.repeats):
            order = modes[r % len(modes):] + modes[: r % len(modes)]
            for mode in order:
                res = run_sweep(a, mode, os.path.join(a.workdir, "runs", f"{r + 1}-{mode}"))
                runs[mode].append(res)
                built = sorted({k for t in res["trials"] for k in t["built"]})
                print(f"  round {r + 1} {mode:10s}: wall {res['wall']:6.1f} s, peak {res['peak_mb']:6.0f} MB summed over "
                      f"up to {res['procs']} processes ({res['samples']} samples), other load "
                      f"{res['other_cores']:.2f} cores; objective "
                      + ", ".join(f"{t['beta']:g}: {t['objective']:.4f}" for t in res["trials"])
                      + f"; caches built: {built or 'none'}", flush=True)
        text = report(a, header, runs)
        print("\n" + text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text + "\n")
    finally:
        if own and not a.keep:
            shutil.rmtree(a.workdir, ignore_errors=True)
        elif own:
            print(f"work folder kept: {a.workdir}")


def by_beta(run: dict) -> dict[float, dict]:
    return {t["beta"]: t for t in run["trials"]}


def report(a, header: str, runs: dict[str, list[dict]]) -> str:
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("wall", "peak_mb", "other_cores")}
           for m, rs in runs.items() if rs}
    lines = [f"{header}.", "",
             f"`python experiments/packing/bench.py --repeats {a.repeats} --steps {a.steps}` (median of {a.repeats}):",
             "",
             "| mode | wall s | peak MB (summed) | wall vs sequential | memory vs parallel | other load (cores) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for mode, m in med.items():
        wall_ratio = f"{m['wall'] / med['sequential']['wall']:.2f}" if "sequential" in med else "-"
        mem_ratio = f"{m['peak_mb'] / med['parallel']['peak_mb']:.2f}" if "parallel" in med else "-"
        lines.append(f"| {mode} | {m['wall']:.1f} | {m['peak_mb']:.0f} | {wall_ratio} | {mem_ratio} "
                     f"| {m['other_cores']:.2f} |")
    lines.append("")
    if "parallel" in runs:
        omp = sorted({v for r in runs["parallel"] for v in r["omp"]})
        lines.append(f"Parallel: up to {max(r['procs'] for r in runs['parallel'])} processes at once "
                     f"(OMP_NUM_THREADS in the sweep's child processes: {', '.join(omp)}).")
    lines.append("")
    lines.append("Objective (" + runs[next(iter(runs))][0]["trials"][0]["objective_metric"] + ") per beta, first round:")
    lines.append("")
    lines.append("| beta | " + " | ".join(runs) + " |")
    lines.append("| --- |" + " --- |" * len(runs))
    for beta in BETAS:
        lines.append(f"| {beta:g} | " + " | ".join(f"{by_beta(rs[0])[beta]['objective']:.4f}" for rs in runs.values())
                     + " |")
    if "packed" in runs and "sequential" in runs:
        lines.append("")
        lines.append("Final eval/loss, packed against sequential (tolerance 1e-5), every round:")
        lines.append("")
        for p, s in zip(runs["packed"], runs["sequential"]):
            for beta in BETAS:
                lp, ls = by_beta(p)[beta]["eval_loss"], by_beta(s)[beta]["eval_loss"]
                lines.append(f"- beta {beta:g}: packed {lp:.6f}, sequential {ls:.6f}, |diff| {abs(lp - ls):.1e}: "
                             f"{'OK' if abs(lp - ls) <= 1e-5 else 'DIFFERS'}")
    lines.append("")
    lines.append("Where the time goes (seconds, median over rounds): start-up to the first job's data, then per job "
                 "model + caches, training, final eval, summed over the jobs where they run one after another; "
                 "the rest is the wall time left (results, MLflow, the sweeper, exit). Parallel jobs overlap: "
                 "their row gives the mean of one job.")
    lines.append("")
    names = ["start-up", "model + caches", "training", "final eval", "rest"]
    lines.append("| mode | jobs | " + " | ".join(names) + " | wall |")
    lines.append("| --- |" + " --- |" * (len(names) + 2))
    for mode, rs in runs.items():
        if not all(r["phases"] for r in rs):
            continue
        overlap = any(r["phases"]["rest"] is None for r in rs)
        cells = []
        for n in names:
            if overlap and n == "rest":
                cells.append("-")
                continue
            jobs_of = (lambda r: r["phases"]["jobs"]) if overlap and n != "start-up" else (lambda r: 1)
            cells.append(f"{statistics.median(r['phases'][n] / jobs_of(r) for r in rs):.1f}")
        jobs = rs[0]["phases"]["jobs"]
        label = f"{mode} (mean of one job)" if overlap else mode
        lines.append(f"| {label} | {jobs} | " + " | ".join(cells) + f" | {med[mode]['wall']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
