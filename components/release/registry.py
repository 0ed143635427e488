"""Loading a trained listing model: from the train step's output or from the MLflow registry.

Both give the same thing: the `ListingModel` with its weights, the spec it was built
from (model kwargs, encoders, `finetune_blocks`), and a reference that says which model
it is (weights sha256, and the registered version and run where there is one), for the
manifests of the steps that use it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from components.config import MODEL_URI, StepPaths
from components.contract import MODEL_SPEC, MODEL_WEIGHTS
from components.core.model import ListingModel
from components.io import activations
from components.io.manifest import AlteredFile, read_run, sha256_file, verify_outputs
from components.release.tracking_store import tracking_uri

WEIGHTS_TAG = "weights_sha256"  # a registered version's tag: the sha256 of its model.pt


@dataclass(frozen=True)
class LoadedModel:
    model: ListingModel
    spec: dict
    reference: dict  # source, weights sha256, registered name/version/run where known


def build_model(spec: dict, weights: Path, device: torch.device) -> ListingModel:
    """The model of `spec` with the weights in `weights`, in eval mode on `device`."""
    tail = None
    if spec.get("finetune_blocks", 0):
        tail = activations.image_encoder(spec, spec["finetune_blocks"], device).tail()
    model = ListingModel(**spec["model"], image_tail=tail)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.to(device).eval()


def load_model(uri: str | None, paths: StepPaths, device: torch.device) -> LoadedModel:
    """`uri` None: the train step's model; else `models:/<name>@<alias>` or
    `models:/<name>/<version>` from the MLflow registry at `paths.mlflow_uri`.

    Raises:
        ValueError: a malformed URI, or a registry entry that does not exist.
        FileNotFoundError: no train step output when `uri` is None.
    """
    if uri is None:
        return _from_train_step(paths, device)
    match = MODEL_URI.match(uri)
    if match is None:
        raise ValueError(
            f"model {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>"
        )
    return _from_registry(uri, match, paths, device)


def _from_train_step(paths: StepPaths, device: torch.device) -> LoadedModel:
    train_dir = paths.step_dir("train")
    manifest = verify_outputs(train_dir, [MODEL_WEIGHTS.name])
    weights = paths.path(MODEL_WEIGHTS)
    record = read_run(train_dir) or {}  # where the weights were registered, if known
    reference = {
        "source": str(train_dir),
        "sha256": manifest["outputs"][MODEL_WEIGHTS.name]["sha256"],  # just verified
        **{
            key: record.get("registered_model", {}).get(key) for key in ("name", "version", "alias")
        },
        "run_id": record.get("mlflow", {}).get("run_id"),
    }
    spec = manifest["model"]
    return LoadedModel(build_model(spec, weights, device), spec, reference)


def _from_registry(uri: str, match, paths: StepPaths, device: torch.device) -> LoadedModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri(paths))
    client = mlflow.MlflowClient()
    try:
        if match["alias"]:
            version = client.get_model_version_by_alias(match["name"], match["alias"])
        else:
            version = client.get_model_version(match["name"], match["version"])
    except MlflowException as err:
        if not _is_absent(err):
            raise
        raise ValueError(f"model {uri!r} is not in the registry at {paths.mlflow_uri}") from err
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        spec_path = _one(local, MODEL_SPEC.name, uri)
        weights = _one(local, MODEL_WEIGHTS.name, uri)
        expected, actual = version.tags.get(WEIGHTS_TAG), sha256_file(weights)
        if expected and actual != expected:
            raise AlteredFile(
                f"model {uri!r}: the downloaded {MODEL_WEIGHTS.name} has sha256 "
                f"{actual[:16]}..., not the {expected[:16]}... registered with version "
                f"{version.version}; the artifact store's copy was altered or damaged"
            )
        spec = json.loads(spec_path.read_text())
        model = build_model(spec, weights, device)
        reference = {
            "source": uri,
            "sha256": actual,
            "name": match["name"],
            "version": str(version.version),
            "alias": match["alias"],
            "run_id": version.run_id,
        }
    return LoadedModel(model, spec, reference)


def identity(reference: dict) -> dict:
    """What a model reference says of the model itself (where it was read from, its
    weights' sha256), without where this machine's registry happened to register it: the
    part a step's manifest records."""
    return {"source": reference["source"], "sha256": reference["sha256"]}


def _one(root: Path, name: str, uri: str) -> Path:
    found = sorted(root.rglob(name))
    if not found:
        raise ValueError(f"model {uri!r} has no {name} among its artifacts")
    return found[0]


def alias_version(paths: StepPaths, name: str, alias: str) -> str | None:
    """The registered version `name@alias` points at; None when the model or the alias
    does not exist. Any other registry error (an unreachable server) is raised: "no
    champion" must never be concluded from a registry that did not answer."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(paths))
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if _is_absent(err):
            return None
        raise


def move_alias(paths: StepPaths, name: str, alias: str, version: str, tags: dict) -> None:
    """Point `name@alias` at `version` and tag that version (e.g. its production version).

    Raises:
        ValueError: `name` version `version` is not in the registry at `paths.mlflow_uri`.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(paths))
    try:
        client.get_model_version(name, version)
    except MlflowException as err:
        if not _is_absent(err):
            raise
        raise ValueError(
            f"model {name} version {version} is not in the registry at {paths.mlflow_uri}"
        ) from err
    client.set_registered_model_alias(name, alias, version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def retire_alias(paths: StepPaths, name: str, alias: str, version: str) -> bool:
    """Remove `name@alias` when it points at `version` (the challenger that became the
    champion); True when it did. An alias on another version stays."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(paths))
    try:
        held = client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if not _is_absent(err):
            raise
        return False
    if str(held.version) != str(version):
        return False
    client.delete_registered_model_alias(name, alias)
    return True


def _is_absent(err) -> bool:
    """The registry answered that the model, version or alias does not exist (a missing
    alias is INVALID_PARAMETER_VALUE), as opposed to not answering at all."""
    return err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
