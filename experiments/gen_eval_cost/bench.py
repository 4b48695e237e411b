"""What generation-based evaluation costs a run: the same run with `eval.gen.enabled` on and off,
side by side.

    python experiments/gen_eval_cost/bench.py                  # the default run and a tiny_sweep trial
    python experiments/gen_eval_cost/bench.py --repeats 5

Each measurement is one `python -m dpo_sweep` child process, timed from start to exit (start-up,
data, caches, training, evals, MLflow logging): the wall time a user waits for one run or one
trial. On and off alternate, after one warm-up run of each case that fills the shared caches
(SFT weights, reference log-probs, reference samples), as the first trial of a sweep does for the
others. Prints the median wall time of each and the share of the run that generation evaluation
takes: (on - off) / on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

CASES = {
    # One final eval, 32 prompts: `python -m dpo_sweep` as it comes.
    "default run": [],
    # Four such trials in one sweep process: a trial pays no process start-up, so the eval's
    # share of a trial is larger than of a run.
    "4-trial sweep of the default": ["beta=0.05,0.1,0.2,0.4"],
    # A trial of experiments/tiny_sweep at its best setting: four evals of 200 prompts each.
    "tiny_sweep trial": ["+experiment=tiny_sweep", "beta=1.0", "optimizer.lr=3e-4"],
}


def run_once(overrides, gen: bool, workdir: str) -> float:
    """Wall seconds of one run in a child process."""
    sweep = any("," in o for o in overrides)
    cmd = [sys.executable, "-m", "dpo_sweep", *overrides, f"eval.gen.enabled={str(gen).lower()}",
           "train.progress=false", f"hydra.{'sweep' if sweep else 'run'}.dir={tempfile.mkdtemp(dir=workdir)}",
           f"tracking.uri=sqlite:///{os.path.join(workdir, 'mlflow.db')}"] + (["-m"] if sweep else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"run failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each case, on and off (default 3)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, overrides in CASES.items():
            run_once(overrides, True, workdir)  # warm-up: caches filled
            run_once(overrides, False, workdir)
            times = {True: [], False: []}
            for _ in range(args.repeats):
                for gen in (False, True):
                    times[gen].append(run_once(overrides, gen, workdir))
            on, off = statistics.median(times[True]), statistics.median(times[False])
            rows.append((name, off, on, (on - off) / on))
            print(f"{name}: off {[round(t, 2) for t in times[False]]} on {[round(t, 2) for t in times[True]]}",
                  flush=True)
    print("\n| case | eval.gen off, s | eval.gen on, s | generation eval's share of the run |")
    print("| --- | --- | --- | --- |")
    for name, off, on, share in rows:
        print(f"| {name} | {off:.2f} | {on:.2f} | {share:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
