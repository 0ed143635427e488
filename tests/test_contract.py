"""The artifact contract: steps in order, each reading only what earlier steps write, each
file written by one step; the CLI and the step modules follow it."""

from __future__ import annotations

import importlib

import pytest

from components import contract
from components.cli import build_parser
from components.contract import STEP_ORDER, STEPS


def test_steps_are_in_pipeline_order_and_read_only_what_earlier_steps_write():
    assert tuple(STEPS) == STEP_ORDER
    written = set()
    for step in STEPS.values():
        for artifact in step.reads:
            assert artifact in written or artifact == contract.manifest_of(artifact.step), (
                f"{step.name} reads {artifact.step}/{artifact.name}, which no earlier step writes"
            )
            assert STEP_ORDER.index(artifact.step) < STEP_ORDER.index(step.name)
        written.update(step.outputs)


def test_every_file_has_one_writer_and_one_name_per_step():
    seen = {}
    for step in STEPS.values():
        assert all(artifact.step == step.name for artifact in step.writes)
        for artifact in step.outputs:
            assert artifact.name not in seen.get(step.name, set()), artifact
            seen.setdefault(step.name, set()).add(artifact.name)


def test_upstream_steps_come_from_what_a_step_reads():
    assert STEPS["catalog"].upstream == ()
    assert STEPS["index"].upstream == ("embed",)
    assert STEPS["promote"].upstream == (
        "validate",
        "featurize",
        "train",
        "embed",
        "index",
        "evaluate",
    )


def test_the_release_holds_artifacts_of_the_steps_promote_reads():
    promote_reads = {a.step for a in STEPS["promote"].reads} | {"promote"}
    assert {a.step for a in contract.RELEASE_FILES} <= promote_reads
    assert set(contract.RELEASE_REPORTS) <= set(contract.RELEASE_FILES)


@pytest.mark.parametrize("name", STEP_ORDER)
def test_each_step_module_runs_the_step_of_its_name(name):
    module = importlib.import_module(f"components.{name}")

    assert callable(module.run)
    assert module.STEP is STEPS[name]


def test_the_cli_has_a_command_per_step_with_its_files_in_the_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices

    assert set(STEP_ORDER) <= set(commands)
    with pytest.raises(SystemExit):
        parser.parse_args(["index", "--help"])
    shown = capsys.readouterr().out
    assert "reads: embed/embeddings, embed/listing_ids.parquet, embed/manifest.json" in shown
    assert (
        "writes: index/index.faiss, index/delta.faiss, index/ids.parquet, "
        "index/changes.parquet, index/base, index/manifest.json"
    ) in shown
