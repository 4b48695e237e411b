"""A sweep with uneven trial lengths through the joblib launcher with two workers, side by side:
trials in batches (a copy of the repository at HEAD, by `git worktree`) against trials launched
as workers free up (this tree). Prints the wall times and their ratio.

    python experiments/dispatch/bench.py                        # once each, batches first
    python experiments/dispatch/bench.py --repeat 3             # alternating; medians and ratio
    python experiments/dispatch/bench.py --rev <commit>         # batches from that commit
    python experiments/dispatch/bench.py --before <checkout>    # batches from another checkout

The sweep: the tiny default model on 200 pairs of the built-in set, the test sizes of
tests/conftest.py, a grid over `train.max_steps` with one long trial (second) among short ones.
Each run is `python -m dpo_sweep ... -m` in a subprocess with PYTHONPATH at the code it measures,
into a folder of its own (study journal, MLflow store). Also checked: every trial COMPLETE in
both, and the same eval/loss at each point in both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

FAST = ["sft.steps=20", "eval.gen.prompts=8", "eval.gen.max_new_tokens=12"]  # as tests/conftest.py
LONG = 600  # steps of the long trial (about 20 s here; a short one trains in well under a second)
SHORT = list(range(4, 14))  # ten short trials
STEPS = [SHORT[0], LONG, *SHORT[1:]]  # the long one second: in the first batch of two
SWEEP = [*FAST, "dataset.builtin_size=200", "train.progress=false", "train.max_steps=" + ",".join(map(str, STEPS)),
         "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2"]


def env_for(code: str) -> dict:
    """The environment of a sweep that runs the code of the checkout `code`."""
    return dict(os.environ, PYTHONPATH=code, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def check_code(code: str) -> None:
    """The sweeper module that the sweep imports comes from `code`, not from the installed tree."""
    out = subprocess.run([sys.executable, "-c", "import dpo_sweep.sweep.loop as m; print(m.__file__)"],
                         env=env_for(code), cwd=tempfile.gettempdir(), capture_output=True, text=True,
                         check=True).stdout.strip()
    assert os.path.realpath(out).startswith(os.path.realpath(code) + os.sep), (code, out)


def run(label: str, code: str, work: str) -> dict:
    """One sweep of `code` into `work`; its wall time, the span of its trials and their results."""
    os.makedirs(work)
    cmd = [sys.executable, "-m", "dpo_sweep", "-m", *SWEEP, f"hydra.sweep.dir={work}/sweep",
           f"tracking.uri=sqlite:///{work}/mlflow.db"]
    start = time.perf_counter()
    with open(os.path.join(work, "sweep.log"), "w") as out:
        proc = subprocess.run(cmd, cwd=work, env=env_for(code), stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, open(os.path.join(work, "sweep.log")).read()[-3000:]
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(os.path.join(work, "sweep", "optuna.journal")))
    trials = optuna.load_study(study_name="sweep", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * len(STEPS), [t.state.name for t in trials]
    long = next(t for t in trials if t.params["train.max_steps"] == LONG)
    first = min(t.datetime_start for t in trials)
    span = (max(t.datetime_complete for t in trials) - first).total_seconds()
    during_long = sum(t.datetime_start < long.datetime_complete for t in trials if t is not long)
    losses = {}
    for t in trials:
        with open(os.path.join(work, "sweep", str(t.number), "metrics.json")) as f:
            losses[t.params["train.max_steps"]] = json.load(f)["metrics"]["eval/loss"]
    print(f"{label:>8}: wall {wall:6.1f} s, trials' span {span:6.1f} s, "
          f"{during_long} of {len(trials) - 1} short trials started before the long one ended", flush=True)
    return {"wall": wall, "span": span, "during_long": during_long, "losses": losses}


@contextlib.contextmanager
def checkout_at(given: str | None, rev: str):
    """`given`, or a `git worktree` of `rev` in a temporary folder, removed at the end."""
    if given:
        yield os.path.abspath(given)
        return
    folder = os.path.join(tempfile.mkdtemp(prefix="dispatch-"), "before")
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", folder, rev], check=True,
                   capture_output=True)
    try:
        yield folder
    finally:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", folder], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, alternating")
    parser.add_argument("--rev", default="HEAD", help="the commit whose sweeper launches in batches")
    parser.add_argument("--before", help="a checkout whose sweeper launches in batches, instead of --rev")
    args = parser.parse_args()
    print(f"grid train.max_steps={','.join(map(str, STEPS))}; 2 workers; {os.cpu_count()} CPUs", flush=True)
    with checkout_at(args.before, args.rev) as before, tempfile.TemporaryDirectory(prefix="dispatch-bench-") as tmp:
        check_code(before)
        check_code(REPO)
        results = {"batches": [], "dispatch": []}
        for i in range(args.repeat):
            results["batches"].append(run("batches", before, os.path.join(tmp, f"batches{i}")))
            results["dispatch"].append(run("dispatch", REPO, os.path.join(tmp, f"dispatch{i}")))
    median = {k: {m: statistics.median(r[m] for r in runs) for m in ("wall", "span")} for k, runs in results.items()}
    same = all(r["losses"] == results["batches"][0]["losses"] for runs in results.values() for r in runs)
    print(f"median wall: batches {median['batches']['wall']:.1f} s, dispatch {median['dispatch']['wall']:.1f} s: "
          f"ratio {median['batches']['wall'] / median['dispatch']['wall']:.2f}x")
    print(f"median trials' span: batches {median['batches']['span']:.1f} s, dispatch "
          f"{median['dispatch']['span']:.1f} s: ratio {median['batches']['span'] / median['dispatch']['span']:.2f}x")
    print(f"same eval/loss at every point in every run: {same}")


if __name__ == "__main__":
    main()
