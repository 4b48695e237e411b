"""The package's layout rules, checked on its source: no import circles between its modules
(imports inside functions included), mlflow imported by tracking alone, optuna by the sweeper
and a trial's reporting alone, every tag name spelled in names.py."""

import ast
import os
import re

from conftest import REPO

PACKAGES = ("dpo_sweep", "hydra_plugins")


def modules():
    """{module name: path} of every module of the package and the plugin."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    found[dotted.removesuffix(".__init__")] = path
    return found


def imports(path, known):
    """The package modules `path` imports, anywhere in it (inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in known:
                    out.add(sub)
                elif node.module in known:
                    out.add(node.module)
    return out


def graph():
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def find_cycle(edges):
    """A list of modules forming a circle, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_circle_through_a_function_level_import(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from pkg import b\n")
    assert imports(str(a), {"pkg", "pkg.b"}) == {"pkg.b"}
    assert find_cycle({"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    assert find_cycle({"pkg.a": {"pkg.b"}, "pkg.b": set()}) is None


def test_no_import_circles():
    edges = graph()
    assert "dpo_sweep.sweep.loop" in edges and "dpo_sweep.report_plots" in edges
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_known_directions():
    edges = graph()

    def reaches(a, b, seen=()):
        return b in edges[a] or any(reaches(n, b, (*seen, a)) for n in edges[a] if n not in seen)

    assert not reaches("dpo_sweep.report_plots", "dpo_sweep.report")
    assert not reaches("dpo_sweep.trl_backend", "dpo_sweep.run")
    assert not any(m.startswith("dpo_sweep.sweep") for m in edges["dpo_sweep.run"])
    assert not any(reaches(m, "dpo_sweep.run") for m in edges if m.startswith("dpo_sweep.sweep"))


def third_party_importers(package):
    pattern = re.compile(rf"^\s*(import {package}\b|from {package}[. ])", re.M)
    return {name for name, path in modules().items() if pattern.search(open(path).read())}


def test_mlflow_and_optuna_have_one_home():
    mlflow_users = third_party_importers("mlflow")
    assert mlflow_users and all(m.startswith("dpo_sweep.tracking.") for m in mlflow_users), mlflow_users
    optuna_users = third_party_importers("optuna")
    assert optuna_users and all(m.startswith("dpo_sweep.sweep") or m == "dpo_sweep.trial_report" for m in optuna_users)


def test_tag_and_attr_names_are_spelled_in_names_py_alone():
    """MLflow tags and Optuna attrs of the sweep are written as names.X, never as literals."""
    literal = re.compile(r"[\"'](sweep\.(role|study_name|storage|folder|sampler|pruner|n_trials|objective|"
                         r"fixed_overrides|state|error|interrupted|resumed_from|recovered_from|owner)|"
                         r"mlflow\.(parentRunId|parent_run_id|tracking_uri|experimentKind|note\.content|data\.context)|"
                         r"best\.(trial_numbers?|registered_model)|run_dir|run_owner|model_id|caches_built)[\"']")
    offenders = {name for name, path in modules().items()
                 if name != "dpo_sweep.names" and literal.search(open(path).read())}
    assert offenders == set()
