"""featurize and embed in shards give the files one unsharded run gives."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from components import contract, embed, featurize, train
from components.config import EmbedConfig, FeaturizeConfig, TrainConfig
from components.core.shards import Shard, every_shard, shard_of
from components.io.embedding_files import embedding_parts
from components.io.feature_store import FeatureStore
from components.io.manifest import read_manifest, read_run
from tests.conftest import fresh_paths, in_fresh_interpreters

pytestmark = pytest.mark.integration

# three chunks of listings, so that every shard has listings in several chunks
CONFIG = FeaturizeConfig(device="cpu", image_size=96, workers=2, listings_per_chunk=25)


def test_shards_partition_listings_by_id_alone():
    ids = [f"listing-{i}" for i in range(3000)]

    counts = Counter(shard_of(i, 4) for i in ids)

    assert sorted(counts) == [0, 1, 2, 3] and min(counts.values()) > 650  # about 750 each
    # by the id alone: the same in any process, whatever its string-hash seed
    code = "from components.core.shards import shard_of; "
    code += "print([shard_of(f'listing-{i}', 4) for i in range(3000)])"
    assert in_fresh_interpreters(code) == [str([shard_of(i, 4) for i in ids])] * 2
    assert sum(Shard(k, 4).owns("listing-7") for k in range(4)) == 1
    assert Shard.parse(" 2/8 ") == Shard(2, 8) and Shard(2, 8).name == "2-of-8"
    for bad in ("8/8", "-1/4", "1-4", "1/0"):
        with pytest.raises(ValueError, match="I/N"):
            Shard.parse(bad)
    with pytest.raises(ValueError, match="shards"):
        every_shard(0)


def _workdir(featurized, tmp_path, name):
    """The fixture's catalog and validated data, nothing featurized yet."""
    paths = fresh_paths(featurized, tmp_path, name)
    (paths.workdir / "featurize").unlink()
    return paths


def test_featurize_and_embed_in_three_shards_write_what_one_run_writes(featurized, tmp_path):
    whole = _workdir(featurized, tmp_path, "whole")
    sharded = _workdir(featurized, tmp_path, "sharded")
    featurize.run(CONFIG, whole)
    for shard in every_shard(3):
        featurize.run(CONFIG, sharded, shard)

    gathered = featurize.gather(CONFIG, sharded, 3)

    one, three = whole.step_dir("featurize"), sharded.step_dir("featurize")
    for name in (contract.VIEWS.name, contract.QUERY_FEATURES.name, contract.SKIPPED_VIEWS.name):
        assert (one / name).read_bytes() == (three / name).read_bytes(), name
    assert read_manifest(one)["outputs"] == read_manifest(three)["outputs"]
    assert pq.ParquetFile(three / contract.VIEWS.name).num_row_groups == 3
    assert gathered.counts["image_views"] == read_manifest(one)["counts"]["image_views"]
    record = read_manifest(three)["encoders"]["image"]
    store_files = sorted(p.name for p in (three / record["store"]).glob("*.npy"))
    assert {f.rsplit("-", 1)[0] for f in store_files} == {f"shard-{s.name}" for s in every_shard(3)}
    keys = pq.read_table(one / contract.VIEWS.name).column("key").to_pylist()
    for modality in ("image", "text"):
        spec = read_manifest(one)["encoders"][modality]
        mine = [
            v["key"]
            for v in pq.read_table(one / "views.parquet").to_pylist()
            if v["modality"] == modality
        ]
        a = FeatureStore(one / "store", spec["id"], spec["dim"]).get(mine)
        b = FeatureStore(three / "store", spec["id"], spec["dim"]).get(mine)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert keys

    # embed with one model: in one run, and in three shards gathered
    train.run(TrainConfig(epochs=2, batch_size=16, hidden=64, dim=32, device="cpu"), whole)
    shutil.copytree(whole.step_dir("train"), sharded.step_dir("train"))
    one, three, result = _embedded_once_and_in_three_shards(
        EmbedConfig(device="cpu"), whole, sharded
    )

    parts = [embedding_parts(one), embedding_parts(three)]
    assert [p.name for p in parts[0]] == [p.name for p in parts[1]] and len(parts[0]) == 3
    for a, b in zip(*parts, strict=True):
        np.testing.assert_allclose(np.load(a), np.load(b), rtol=1e-5, atol=1e-6)
    assert result.counts["listings"] == read_manifest(one)["counts"]["listings"]
    assert result.counts["listings_per_s"] > 0


def test_a_gather_s_rate_is_over_the_wall_its_shards_took_side_by_side_or_in_turn():
    def runs(*spans):
        return [
            {"started_at": f"2026-01-01T00:00:{start:02d}+00:00", "duration_s": seconds}
            for start, seconds in spans
        ]

    in_turn = runs((0, 10.0), (10, 10.0), (20, 10.5))
    assert embed._wall_seconds(in_turn) == pytest.approx(30.5)  # not the longest shard alone
    assert embed._wall_seconds(runs((0, 10.0), (0, 12.0), (1, 9.0))) == pytest.approx(12.0)


def test_a_gather_names_the_shard_that_has_not_run(featurized, tmp_path):
    paths = _workdir(featurized, tmp_path, "partial")
    featurize.run(CONFIG, paths, Shard(0, 2))

    with pytest.raises(FileNotFoundError, match=r"shard 1/2 has not finished.*--shard 1/2"):
        featurize.gather(CONFIG, paths, 2)
    with pytest.raises(ValueError, match="shard 0/2 ran with other featurize params"):
        featurize.gather(CONFIG.model_copy(update={"image_size": 64}), paths, 2)


def test_the_cli_runs_shards_and_refuses_sharding_a_step_that_has_none(featurized, tmp_path):
    paths = _workdir(featurized, tmp_path, "cli")
    common = [
        "--set",
        f"paths.workdir={paths.workdir}",
        "--set",
        f"paths.catalog={paths.catalog}",
        "--set",
        "featurize.image_size=96",
        "--set",
        "featurize.device=cpu",
    ]
    run = [sys.executable, "-m", "components", "featurize", *common]
    shards = [subprocess.Popen([*run, "--shard", f"{i}/2"]) for i in range(2)]  # side by side
    assert [p.wait(timeout=300) for p in shards] == [0, 0]

    gathered = subprocess.run([*run, "--gather", "2"], capture_output=True, text=True)
    refused = subprocess.run(
        [sys.executable, "-m", "components", "train", *common[:4], "--shard", "0/2"],
        capture_output=True,
        text=True,
    )
    bad = subprocess.run([*run, "--shard", "2/2"], capture_output=True, text=True)

    assert gathered.returncode == 0, gathered.stderr
    assert "gathered from 2 shards" in gathered.stdout
    assert refused.returncode == 2 and "--shard" in refused.stderr
    assert bad.returncode == 2 and "0 <= I < N" in bad.stderr


def test_sharded_featurize_reads_no_unchanged_image_twice_and_writes_the_same_files(
    featurized, tmp_path
):
    from components import validate
    from components.config import ValidateConfig

    paths = _workdir(featurized, tmp_path, "trusting")
    (paths.workdir / "validate").unlink()
    shutil.copytree(featurized.step_dir("validate"), paths.workdir / "validate")
    validate.run(ValidateConfig(workers=2, verify_content=False), paths)  # a refresh's
    for shard in every_shard(3):
        featurize.run(CONFIG, paths, shard)
    featurize.gather(CONFIG, paths, 3)
    out = paths.step_dir("featurize")
    names = (contract.VIEWS.name, contract.QUERY_FEATURES.name, contract.SKIPPED_VIEWS.name)
    first = {name: (out / name).read_bytes() for name in names}

    for shard in every_shard(3):  # the next refresh: the image keys gathered are trusted
        featurize.run(CONFIG, paths, shard)
    featurize.gather(CONFIG, paths, 3)

    opened = [
        read_run(featurize.shard_dir(paths, shard))["reads"]["images_opened"]
        for shard in every_shard(3)
    ]
    assert opened == [0, 0, 0] and read_run(out)["reads"]["images_opened"] == 0
    assert {name: (out / name).read_bytes() for name in names} == first


def test_a_refresh_embedded_in_three_shards_appends_what_one_run_appends(copied, tmp_path):
    from components import refresh
    from components.config import with_overrides
    from components.io.embedding_files import DELETED
    from tests.harness import refresh as harness

    harness.change_catalog(copied.workdir / "catalog", 4, 2, 1, 2)
    params = with_overrides(harness.params(copied), refresh.REFRESH)
    for step in ("validate", "featurize"):
        refresh.run_step(step, params, copied)
    sharded = harness.copy(copied, tmp_path / "sharded")

    one, three, result = _embedded_once_and_in_three_shards(
        params.section("embed"), copied, sharded
    )

    folders = [one / contract.EMBEDDINGS.name, three / contract.EMBEDDINGS.name]
    names = [sorted(p.name for p in folder.iterdir()) for folder in folders]
    assert names[0] == names[1] and DELETED in names[0]  # the release's parts, one appended
    for name in names[0]:
        a, b = (np.load(folder / name) for folder in folders)
        if name == DELETED or name in _released_parts(copied):  # kept as they were
            assert np.array_equal(a, b), name
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    counts = read_manifest(one)["counts"]
    for key in ("listings", "reused", "added", "changed", "removed", "compacted"):
        assert result.counts[key] == counts[key], key
    assert (counts["added"], counts["changed"], counts["removed"]) == (4, 3, 2)


def _embedded_once_and_in_three_shards(config: EmbedConfig, whole, sharded):
    """embed in one run on `whole`, and in three shards gathered on `sharded`: the same
    listing ids and missing listings. Returns both embed folders and the gather's result."""
    embed.run(config, whole)
    for shard in every_shard(3):
        embed.run(config, sharded, shard)
    result = embed.gather(config, sharded, 3)
    one, three = whole.step_dir("embed"), sharded.step_dir("embed")
    for name in (contract.EMBEDDED_IDS.name, contract.MISSING.name):
        assert pq.read_table(one / name).equals(pq.read_table(three / name)), name
    return one, three, result


def _released_parts(paths) -> set[str]:
    from components.release import production

    store = production.open_store(paths)
    pointer = production.read_pointer(store)
    files = production.read_manifest(store, pointer.version, pointer.manifest_sha256)["files"]
    return {name.split("/", 1)[1] for name in files if name.startswith("embeddings/part-")}
