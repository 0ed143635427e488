"""The champion: the model a new one is compared with before it may replace it.

`evaluate.champion` is `current` (the model of the production store's CURRENT version),
a `models:/` registry URI, or null (no comparison); config.py refuses anything else.
"""

from __future__ import annotations

import logging

import torch

from components.config import CURRENT_CHAMPION, StepPaths
from components.release import production, registry

log = logging.getLogger(__name__)


def load_champion(
    choice: str | None, paths: StepPaths, device: torch.device
) -> registry.LoadedModel | None:
    """The champion model, or None when there is none to compare with: `choice` is null,
    or `current` before anything was promoted to the local default store. Anything named
    that cannot be found (a registry URI that does not resolve, an explicit store that does
    not exist, a CURRENT whose model cannot be loaded) is an error naming
    `evaluate.champion`: a missing champion must never pass the regression gates."""
    if choice is None:
        return None
    if choice == CURRENT_CHAMPION:
        return _current_champion(paths, device)
    try:
        return registry.load_model(choice, paths, device)
    except ValueError as err:
        raise ValueError(f"evaluate.champion {choice!r}: {err}") from err


def _current_champion(paths: StepPaths, device: torch.device) -> registry.LoadedModel | None:
    storage = production.open_store(paths)
    pointer = production.read_pointer(storage)
    if pointer is None:
        log.info("evaluate: no champion to compare with (nothing promoted to %s)", storage.uri)
        return None
    uri = f"models:/{pointer.model['name']}/{pointer.model['version']}"
    try:
        loaded = registry.load_model(uri, paths, device)
    except ValueError as err:
        raise ValueError(
            f"the champion, {storage.locate(production.POINTER)} = {pointer.version}, names "
            f"{uri}, which cannot be loaded: {err}"
        ) from err
    reference = loaded.reference | {"production_version": pointer.version, "store": storage.uri}
    return registry.LoadedModel(loaded.model, loaded.spec, reference)
