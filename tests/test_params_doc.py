"""docs/params.md is the params reference the config models generate, and every value the
README and params.yaml write goes through the params parser."""

from __future__ import annotations

import json
import re

import pytest

from components.cli import main
from components.config import Params, load_params, params_reference
from tests.conftest import REPO_ROOT

PARAMS = REPO_ROOT / "params.yaml"
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def test_the_params_reference_is_current():
    written = (REPO_ROOT / "docs" / "params.md").read_text()

    assert written == params_reference(), "docs/params.md is stale: run make params-doc"


def test_the_reference_names_every_key_of_params_yaml():
    written = (REPO_ROOT / "docs" / "params.md").read_text()
    documented = set(re.findall(r"^\| `([\w.]+)` \|", written, flags=re.MULTILINE))

    assert documented == set(_keys(Params().model_dump(by_alias=True)))


def _keys(values: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        nested = isinstance(value, dict) and key not in _MAPS
        keys += _keys(value, f"{prefix}{key}.") if nested else [f"{prefix}{key}"]
    return keys


# params whose value is a mapping of the user's keys, not a section
_MAPS = {"min", "max_regression", "min_gain_over_frozen", "timeout_minutes", "cpu"}
_MAPS |= {"gpu_node_selector", "cpu_node_selector", "gpu_step_resources", "env"}


def _set_examples() -> list[tuple[str, str]]:
    """Every `--set KEY=VALUE` and `-S KEY=VALUE` written in the README and docs/, but
    placeholders (`section.key=value`, `=...`, `=F`)."""
    found = []
    pattern = r"(?:--set|-S) ([a-z_]+\.[\w./@]+=[^\s`'\"\]),]*)"
    for path in DOCS:
        for match in re.finditer(pattern, path.read_text()):
            key, value = match.group(1).split("=", 1)
            if key != "section.key" and not re.fullmatch(r"[A-Z]|\.\.\.", value):
                found.append((path.name, match.group(1)))
    return found


@pytest.mark.parametrize(("doc", "override"), _set_examples())
def test_every_set_example_in_the_docs_parses(doc, override):
    load_params(PARAMS, [override])  # raises ConfigError naming the key if it does not


def test_the_docs_have_set_examples_to_check():
    assert len(_set_examples()) >= 10


def _commented_choices() -> list[tuple[str, str]]:
    """(key, value) for each alternative a params.yaml comment offers, `# a | b | c`,
    with the key's section path."""
    found, path = [], []
    for line in PARAMS.read_text().splitlines():
        match = re.match(r"^( *)([\w]+):(.*)$", line)
        if not match or line.lstrip().startswith("#"):
            continue
        depth = len(match.group(1)) // 2
        path = [*path[:depth], match.group(2)]
        value, _, comment = match.group(3).partition("#")
        if value.strip() and "|" in comment:
            words = [re.match(r"\s*([\w.-]+)", part) for part in comment.split("|")]
            found += [(".".join(path), word.group(1)) for word in words if word]
    return found


@pytest.mark.parametrize(("key", "value"), _commented_choices())
def test_every_choice_a_params_comment_offers_parses(key, value):
    load_params(PARAMS, [f"{key}={value}"])


def test_the_params_yaml_comments_offer_choices():
    assert ("train.objective", "pairwise") in _commented_choices()


def test_the_schema_describes_params_yaml(capsys):
    assert main(["--schema"]) == 0

    schema = json.loads(capsys.readouterr().out)
    assert {"validate", "train", "evaluate", "storage"} <= set(schema["properties"])
