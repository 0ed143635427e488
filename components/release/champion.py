"""The champion: the model a new one is compared with before it may replace it.

`evaluate.champion` is `current` (the model of the production store's CURRENT version),
a `models:/` registry URI, or null (no comparison).
"""

from __future__ import annotations

import logging

import torch

from components.config import StepPaths
from components.release import production, registry
from components.release.storage import open_storage

CURRENT = "current"

log = logging.getLogger(__name__)


def load_champion(
    choice: str | None, paths: StepPaths, device: torch.device
) -> registry.LoadedModel | None:
    """The champion model, or None when there is none to compare with: `choice` is null,
    nothing was promoted yet, or a registry URI that does not resolve. A CURRENT whose
    model cannot be loaded is an error, not "no champion"."""
    if choice is None:
        return None
    if choice == CURRENT:
        return _current_champion(paths, device)
    try:
        return registry.load_model(choice, paths, device)
    except ValueError as err:
        log.info("evaluate: no champion to compare with (%s)", err)
        return None


def _current_champion(paths: StepPaths, device: torch.device) -> registry.LoadedModel | None:
    storage = open_storage(paths.storage, paths.storage_uri)
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
