import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests name their own stores

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from dpo_sweep.models import char_tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


def make_tiny_llama(tokenizer, seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_llama(tokenizer)


# The generation eval and the SFT stage at test size (seconds less per run); they come first, so
# a test that sets one of these keys itself wins (the last value of a key counts).
FAST = ["sft.steps=20", "eval.gen.prompts=8", "eval.gen.max_new_tokens=12"]


def compose(overrides=()):
    """The real configs composed by Hydra, as `python -m dpo_sweep <overrides>` would (with the
    FAST test sizes unless the overrides set them)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dpo_sweep.config import register
    from dpo_sweep.paths import conf_dir

    register()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*FAST, *overrides])


def write_jsonl(path, rows):
    import json

    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def postgres_bin_dir():
    """The folder of PostgreSQL's server programs (initdb, pg_ctl): on the PATH, or Debian's
    /usr/lib/postgresql/<version>/bin (newest version); None when PostgreSQL is not installed."""
    import glob
    import shutil

    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return os.path.dirname(os.path.realpath(found))
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2].split(".")[0]))
    return next((f for f in reversed(folders) if os.path.exists(os.path.join(f, "pg_ctl"))), None)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 (a free port, trust auth, fsync off) with one
    database; yields its SQLAlchemy URL and stops the server at the end. PostgreSQL refuses to run
    as root, so as root the server runs as the `postgres` OS user (created by the apt package).
    Skipped, saying why, where PostgreSQL is not installed (`.ci/run` installs it)."""
    import pwd
    import shutil
    import subprocess
    import tempfile

    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no pg_ctl on the PATH or under /usr/lib/postgresql/*/bin); "
                    "install it with `apt-get install postgresql`, as .ci/run does")
    psycopg2 = pytest.importorskip("psycopg2", reason="the PostgreSQL driver is missing: pip install psycopg2-binary "
                                   "(in the test extra)")
    user = {}
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` OS user to run PostgreSQL as "
                        "(PostgreSQL refuses to run as root; `apt-get install postgresql` creates the user)")
        user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    root = tempfile.mkdtemp(prefix="dpo-sweep-pg-")  # under /tmp: pytest's own tmp folders are root-only
    if user:
        os.chown(root, user["user"], user["group"])
    data, log_file, port = os.path.join(root, "data"), os.path.join(root, "server.log"), free_port()

    def pg(program, *args):
        proc = subprocess.run([os.path.join(bin_dir, program), *args], cwd=root, capture_output=True, text=True,
                              timeout=120, **user)
        if proc.returncode != 0:
            server_log = open(log_file).read()[-3000:] if os.path.exists(log_file) else ""
            raise RuntimeError(f"{program} {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}{server_log}")

    try:
        pg("initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
        pg("pg_ctl", "-D", data, "-l", log_file, "-w", "-t", "60", "start",
           "-o", f"-h 127.0.0.1 -p {port} -k {root} -F")
        try:
            conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute("CREATE DATABASE dpo_sweep_test")
            conn.close()
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/dpo_sweep_test"
        finally:
            pg("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")  # throwaway: no shutdown checkpoint
    finally:
        shutil.rmtree(root, ignore_errors=True)


# Test files that run whole sweeps, servers or killed processes: tens of seconds to minutes each.
# They are collected first, so that the two workers (pyproject.toml: -n 2 --dist loadfile) share
# them and end together with the quick files, instead of one worker finishing a long file alone.
LONG_FILES = ("test_sweep.py", "test_faults.py", "test_pack_sweep.py", "test_scale_out.py", "test_distributed.py",
              "test_resume_faults.py",
              "test_newcomer.py", "test_reproduce.py", "test_run.py", "test_credentials.py", "test_preflight.py",
              "test_sweep_folders.py", "test_trl_parity.py", "test_dispatch.py", "test_ui_browser.py",
              "test_mlflow_conventions.py", "test_report.py", "test_experiments.py", "test_trl_backend.py",
              "test_packing.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: a file keeps its order
