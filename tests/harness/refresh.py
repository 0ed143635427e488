"""A promoted tiny release to refresh, and the catalog changes a refresh is tested on:
used by tests/test_refresh.py and tests/test_refresh_guards.py (fixtures `released` and
`copied` in conftest.py)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from components import embed, evaluate, index, promote, train
from components.config import (
    EmbedConfig,
    FeaturizeConfig,
    IndexConfig,
    Params,
    PromoteConfig,
    StalenessConfig,
    StepPaths,
    load_params,
)

FEATURIZE = FeaturizeConfig(device="cpu", image_size=96, workers=2)
# the profile's sample as the refreshes below take it (`params`): theirs is carried from it
PROFILED = StalenessConfig(profile_listings=50, permutations=100)


def release(featurized: StepPaths, work: Path) -> StepPaths:
    """A workdir of its own at `work` (the features copied, not shared) with a retrain of
    the tiny model promoted into its local store."""
    from tests.test_evaluate import TINY
    from tests.test_promote import EVALUATE

    for step in ("catalog", "validate", "featurize"):
        shutil.copytree(featurized.step_dir(step), work / step)
    paths = at(featurized, work)
    train.run(TINY, paths)
    embed.run(EmbedConfig(device="cpu"), paths)
    index.run(IndexConfig(), paths)
    evaluate.run(EVALUATE.model_copy(update={"staleness": PROFILED}), paths)
    promote.run(PromoteConfig(), paths)
    return paths


def copy(paths: StepPaths, work: Path) -> StepPaths:
    """The workdir copied to `work` (store and registry included)."""
    shutil.copytree(paths.workdir, work, symlinks=True)
    return at(paths, work)


def at(paths: StepPaths, work: Path) -> StepPaths:
    return dataclasses.replace(
        paths,
        workdir=work,
        catalog=str(work / "catalog"),
        tracking_uri=f"sqlite:///{work / 'mlflow.db'}",
    )


def params(paths: StepPaths, *overrides: str) -> Params:
    """params.yaml for a refresh of `paths` on the tiny catalog (lenient recall gates)."""
    from tests.conftest import REPO_ROOT

    return load_params(
        REPO_ROOT / "params.yaml",
        [
            f"paths.workdir={paths.workdir}",
            f"paths.catalog={paths.catalog}",
            "validate.workers=2",
            *(f"featurize.{k}={v}" for k, v in FEATURIZE.model_dump().items() if k != "text_views"),
            "embed.device=cpu",
            "evaluate.gates.min={}",
            "evaluate.gates.min_gain_over_frozen={}",
            "evaluate.gates.min_queries=1",
            "evaluate.ks=[1, 10, 50]",
            "evaluate.bootstrap=100",
            f"evaluate.staleness.profile_listings={PROFILED.profile_listings}",
            f"evaluate.staleness.permutations={PROFILED.permutations}",
            *overrides,
        ],
    )


def change_catalog(root: Path, added: int, retitled: int, rephotographed: int, removed: int):
    """The catalog with `added` new listings (copies of others under new ids, photos
    mirrored), `retitled` and `rephotographed` listings, and `removed` ones gone. Returns
    the ids of each group."""
    table = pq.read_table(root / "listings.parquet")
    rows = table.to_pylist()
    gone = [r["listing_id"] for r in rows[-removed:]] if removed else []
    rows = rows[: len(rows) - removed]
    retitle = [r["listing_id"] for r in rows[:retitled]]
    for row in rows[:retitled]:
        row["title"] = f"{row['title']} (new edition)"
    rephoto = [r["listing_id"] for r in rows[retitled : retitled + rephotographed]]
    for row in rows[retitled : retitled + rephotographed]:
        row["image_uris"] = [mirrored(root, row["image_uris"][0]), *row["image_uris"][1:]]
    new = []
    for n, source in enumerate(rows[10 : 10 + added]):
        copy = dict(source, listing_id=f"new-{n}", title=f"Brand new {source['title']}")
        copy["image_uris"] = [mirrored(root, ref) for ref in source["image_uris"]]
        rows.append(copy)
        new.append(copy["listing_id"])
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), root / "listings.parquet")
    return {"added": new, "changed": retitle + rephoto, "removed": gone}


def drop_listings(root: Path, listing_ids: set[str]) -> None:
    """The catalog without `listing_ids` (a marketplace's export after they sold)."""
    table = pq.read_table(root / "listings.parquet")
    rows = [row for row in table.to_pylist() if row["listing_id"] not in listing_ids]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), root / "listings.parquet")


def mirrored(root: Path, ref: str) -> str:
    target = f"{ref.rsplit('.', 1)[0]}-flipped.png"
    if not (root / target).exists():
        ImageOps.flip(Image.open(root / ref).convert("RGBA")).save(root / target)
    return target
