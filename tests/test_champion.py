"""The champion lookup fails closed: what `evaluate.champion` names must be found, or
evaluate stops; only null, or `current` before the first promotion, means no champion."""

from __future__ import annotations

import pytest
import torch

from components.config import StepPaths, StorageConfig
from components.release import production
from components.release.champion import load_champion
from components.release.storage import open_storage

CPU = torch.device("cpu")


def _paths(tmp_path, store: str | None = None) -> StepPaths:
    return StepPaths(
        workdir=tmp_path / "work",
        catalog="unused",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        storage=StorageConfig(uri=store),
    )


def test_no_champion_only_when_asked_for_none_or_before_the_first_promotion(tmp_path):
    assert load_champion(None, _paths(tmp_path), CPU) is None
    assert load_champion("current", _paths(tmp_path), CPU) is None  # default store, empty


def test_a_registry_uri_that_does_not_resolve_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(ValueError) as error:
        load_champion("models:/listing-encoder@curent", _paths(tmp_path), CPU)

    message = str(error.value)
    assert message.startswith("evaluate.champion 'models:/listing-encoder@curent': ")
    assert "is not in the registry" in message


def test_current_on_an_explicit_store_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(production.NoStore, match="no production store there"):
        load_champion("current", _paths(tmp_path, str(tmp_path / "prodution")), CPU)


def test_current_on_a_created_store_with_nothing_promoted_is_no_champion(tmp_path):
    paths = _paths(tmp_path, str(tmp_path / "store"))
    production.create_store(open_storage(paths.storage))

    assert load_champion("current", paths, CPU) is None
