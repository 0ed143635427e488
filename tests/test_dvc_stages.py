"""dvc.yaml agrees with the code: each stage runs its step, declares every file the step
reads (per the artifact contract) as a dep and exactly what it writes as outs, never a
machine-local file or cache (so the same inputs give the same dvc.lock anywhere), and lists
code deps that cover every module its step can import, so no code change leaves a stale
stage "up to date"."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
import yaml

from components.contract import STEP_ORDER, STEPS
from tests.conftest import REPO_ROOT
from tests.import_graph import ROOT, closure, modules

WORKDIR = "artifacts"
STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def _paths(entries) -> list[str]:
    """Paths of a stage's deps / outs / metrics / plots (plain or {path: options})."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def _covered(path: str, by: list[str]) -> bool:
    target = PurePosixPath(path)
    return any(target == PurePosixPath(p) or PurePosixPath(p) in target.parents for p in by)


def _outs(stage: dict) -> list[str]:
    return _paths(stage.get("outs")) + _paths(stage.get("metrics")) + _paths(stage.get("plots"))


def test_one_stage_per_step_running_it():
    assert list(STAGES) == list(STEP_ORDER)
    for name, stage in STAGES.items():
        assert stage["cmd"] == f"python -m components {name}"


@pytest.mark.parametrize("step", STEP_ORDER)
def test_a_stage_declares_what_its_step_reads_and_writes(step):
    stage = STAGES[step]
    deps, outs = _paths(stage.get("deps")), _outs(stage)

    # a cache (persistent) is keyed by content: what is read from it is named by another
    # dep (views.parquet's keys, the model), so it need not be a dep itself
    tracked = [a.path(WORKDIR).as_posix() for a in STEPS[step].reads if a.tracked]
    untracked = [a.path(WORKDIR).as_posix() for a in STEPS[step].reads if not a.tracked]
    written = [a.path(WORKDIR).as_posix() for a in STEPS[step].outputs if a.tracked]

    assert [p for p in tracked if not _covered(p, deps)] == []
    assert [p for p in deps if any(_covered(u, [p]) for u in untracked)] == []
    assert sorted(outs) == sorted(written)  # exactly: a folder would hash its run.json


@pytest.mark.parametrize("step", STEP_ORDER)
def test_code_deps_cover_every_module_the_step_can_import(step):
    deps = _paths(STAGES[step].get("deps"))
    # `python -m components <step>`: the CLI loads, then imports the step's module
    run = closure(
        "components.__main__", f"components.{step}", loaded_only=frozenset({"components.cli"})
    )
    files = sorted(modules()[module].relative_to(ROOT).as_posix() for module in run)

    missing = [path for path in files if not _covered(path, deps)]

    assert missing == [], f"stage {step}: add to its deps (or their folder): {missing}"


@pytest.mark.parametrize("step", STEP_ORDER)
def test_code_deps_exist(step):
    code = [p for p in _paths(STAGES[step].get("deps")) if p.startswith("components")]
    assert [p for p in code if not (REPO_ROOT / p).exists()] == []


def _code_dirs() -> list[str]:
    deps = {d for stage in STAGES.values() for d in _paths(stage.get("deps"))}
    return sorted(d for d in deps if (REPO_ROOT / d).is_dir() and d.startswith("components"))


def test_directory_deps_hash_no_compiled_or_cache_file():
    """A directory dep hashes what it holds: a lock written beside compiled files (every
    machine that ran the code has them) would not match a clean clone's, and `make run`
    there would rewrite dvc.lock. `.dvcignore` keeps them out; a source file stays in."""
    import subprocess
    import sys

    strays = ["__pycache__/step.cpython-311.pyc", "module.pyc", ".pytest_cache/v/x"]
    targets = [f"{folder}/{stray}" for folder in _code_dirs() for stray in strays]
    source = "components/core/model.py"
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "check-ignore", *targets, source],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    ignored = set(done.stdout.split())
    assert [t for t in targets if t not in ignored] == [], "hashed into dvc.lock"
    assert source not in ignored
