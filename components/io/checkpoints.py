"""Training checkpoints on disk: written atomically, checked before they are loaded.

`<dir>/epoch-<n>.pt` holds one epoch's state; `<dir>/last.json` names the newest one with
its sha256 and is replaced last, so a process killed at any point leaves the previous
checkpoint whole and named (the older file is deleted only after the switch). Loading
checks the sha256 and unpickles with `weights_only=True`: tensors and plain containers,
never arbitrary objects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from components.io.manifest import AlteredFile, sha256_file

POINTER = "last.json"


def save(directory: Path, state: dict[str, Any], epoch: int) -> Path:
    """Write `state` as the checkpoint of `epoch` and make it the last one."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"epoch-{epoch:06d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    previous = _pointed(directory)
    pointer = directory / POINTER
    pointer_tmp = pointer.with_suffix(".json.tmp")
    pointer_tmp.write_text(json.dumps({"file": path.name, "sha256": digest, "epoch": epoch}))
    os.replace(pointer_tmp, pointer)
    if previous is not None and previous != path.name:
        (directory / previous).unlink(missing_ok=True)
    return path


def load(directory: Path, map_location: torch.device | str = "cpu") -> dict[str, Any] | None:
    """The last checkpoint's state; None when there is none.

    Raises:
        AlteredFile: the checkpoint file is missing or not the one `last.json` recorded.
    """
    pointer = _pointer(directory)
    if pointer is None:
        return None
    path, expected = directory / pointer["file"], pointer["sha256"]
    if not path.is_file():
        raise AlteredFile(
            f"{path}: named by {directory / POINTER} but missing; delete {directory} to "
            "train afresh"
        )
    if (actual := sha256_file(path)) != expected:
        raise AlteredFile(
            f"{path}: sha256 {actual[:16]}... is not the {expected[:16]}... recorded in "
            f"{directory / POINTER}; the checkpoint was altered or damaged: delete {directory} "
            "to train afresh"
        )
    return torch.load(path, map_location=map_location, weights_only=True)


def _pointed(directory: Path) -> str | None:
    pointer = _pointer(directory)
    return None if pointer is None else pointer["file"]


def _pointer(directory: Path) -> dict | None:
    path = directory / POINTER
    if not path.is_file():
        return None
    try:
        pointer = json.loads(path.read_text())
        return {"file": str(pointer["file"]), "sha256": str(pointer["sha256"])}
    except (ValueError, KeyError, TypeError) as err:
        raise AlteredFile(
            f"{path} is not a checkpoint pointer ({err}); delete {directory} to train afresh"
        ) from None
