"""The artifact contract: the pipeline's steps in order, and every file each step writes
and reads.

A step writes under `<workdir>/<step>/` and reads only what its upstream steps wrote
there. This module is the one place where those names are written: the steps, the CLI,
the production store, the Airflow DAG, the Kubeflow pipeline and the tests all read it,
and `tests/test_dvc.py` checks that `dvc.yaml` declares the same deps and outs.

It imports nothing from the project: every layer may import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

StepName = Literal[
    "catalog", "validate", "featurize", "train", "embed", "index", "evaluate", "promote"
]
STEP_ORDER: tuple[StepName, ...] = get_args(StepName)  # the pipeline's steps, in order
# steps that run as N shards side by side and a gather (`--shard I/N`, `--gather N`)
SHARDED_STEPS: tuple[StepName, ...] = ("featurize", "embed")

MANIFEST = "manifest.json"  # every step writes one beside its outputs
# a listing with this many photos gives one up as a val/test view-to-listing query
HELD_OUT_MIN_PHOTOS = 3


@dataclass(frozen=True)
class Artifact:
    """One file (or folder) a step writes: `<workdir>/<step>/<name>`."""

    step: StepName
    name: str
    what: str
    folder: bool = False
    persistent: bool = False  # kept between runs (a cache), never deleted by a rerun
    # machine-local: it depends on this machine's production store, registry or clock, so
    # DVC never hashes it (dvc.yaml does not declare it), as with every step's run.json
    local: bool = False

    @property
    def tracked(self) -> bool:
        """Declared to DVC: a reproducible output, neither a cache nor machine-local."""
        return not (self.persistent or self.local)

    def path(self, workdir: Path | str) -> Path:
        return Path(workdir) / self.step / self.name


def manifest_of(step: StepName) -> Artifact:
    return Artifact(step, MANIFEST, f"the {step} step's manifest: params, hashes, counts")


# catalog: the sample catalog (the data contract of any catalog: DESIGN.md section 3)
LISTINGS = Artifact("catalog", "listings.parquet", "one row per listing")
QUERIES = Artifact("catalog", "queries.parquet", "search queries and their relevant listings")
IMAGES = Artifact("catalog", "images", "image files the listings refer to", folder=True)

# validate
CLEAN = Artifact("validate", "clean.parquet", "rows that passed, every original column")
QUARANTINE = Artifact("validate", "quarantine.parquet", "rows that failed, with reasons")
CLEAN_QUERIES = Artifact("validate", "queries.parquet", "queries of clean listings")
QUARANTINED_QUERIES = Artifact("validate", "queries_quarantine.parquet", "bad query rows")
VALIDATION_REPORT = Artifact("validate", "report.json", "counts per reason, examples")
IMAGE_CHECKS = Artifact(
    "validate",
    "image_checks.parquet",
    "each image's verdict under its identity (size, mtime or ETag): what a refresh trusts",
    persistent=True,
)
LISTING_STATE = Artifact(
    "validate",
    "listing_state.parquet",
    "each clean listing's state: a hash of its row and its images' identities",
    persistent=True,
)

# featurize
VIEWS = Artifact("featurize", "views.parquet", "one row per usable view, its content key")
QUERY_FEATURES = Artifact("featurize", "queries.parquet", "clean queries with content keys")
SKIPPED_VIEWS = Artifact("featurize", "skipped.parquet", "views that could not be read")
IMAGE_KEYS = Artifact(
    "featurize",
    "image_keys.parquet",
    "each image's content key under its identity: what a refresh trusts",
    persistent=True,
)
VIEWS_INDEX = Artifact(
    "featurize",
    "views_index.parquet",
    "each listing's state and where its rows are in views.parquet: what a refresh takes whole",
    persistent=True,
)
FEATURE_STORE = Artifact(
    "featurize", "store", "feature vectors by content key, per encoder", True, True
)

# train
SPLITS = Artifact("train", "splits.parquet", "train/val/test split of queries and views")
MODEL_WEIGHTS = Artifact("train", "model.pt", "the best epoch's weights")
MODEL_SPEC = Artifact("train", "model_spec.json", "how to rebuild the model from its weights")
HISTORY = Artifact("train", "history.json", "per-epoch losses and validation metrics")
TRAIN_METRICS = Artifact("train", "metrics.json", "the best epoch's validation metrics")
CHECKPOINTS = Artifact("train", "checkpoints", "the last epoch's state, to resume", True, True)
ACTIVATIONS = Artifact(
    "train", "activations", "backbone activations by image content (fine-tuning)", True, True
)

# embed
EMBEDDINGS = Artifact("embed", "embeddings", "float32 unit rows, part-NNNNNN.npy", folder=True)
EMBEDDED_IDS = Artifact("embed", "listing_ids.parquet", "listing_id of each embedding row")
MISSING = Artifact("embed", "missing.parquet", "clean listings without an embedding, why")
EMBED_SPLITS = Artifact(
    "embed",
    "splits.parquet",
    "the splits the model was trained with (held-out views, test queries): train's, or in "
    "a refresh the release's",
)

PRINTS_INDEX = Artifact(
    "embed",
    "prints_index.parquet",
    "each listing's fingerprint under the state featurize indexed it in: what a refresh carries",
    persistent=True,
)
EMBED_BASE = Artifact(
    "embed",
    "base",
    "a refresh's cache of the release it builds on: ids, fingerprints, embeddings",
    folder=True,
    persistent=True,
)

# index
INDEX = Artifact("index", "index.faiss", "the FAISS index, its vectors labelled")
INDEX_IDS = Artifact("index", "ids.parquet", "the listing of each label (listing_id, id)")
INDEX_DELTA = Artifact(
    "index",
    "delta.faiss",
    "the vectors refreshes added since index.faiss was written whole, an index of its type "
    "(empty after a full build); under a label it holds, and for a label the id map no "
    "longer names, index.faiss's vector is not live",
)
INDEX_CHANGES = Artifact(
    "index",
    "changes.parquet",
    "the listings a refresh added, changed or removed since the release it built on "
    "(listing_id, change); none in a retrain",
    local=True,  # relative to the production store's release
)
INDEX_BASE = Artifact(
    "index", "base", "a refresh's cache of the index it updates", folder=True, persistent=True
)

# evaluate
METRICS = Artifact(
    "evaluate",
    "metrics.json",
    "headline metrics of the test split: recall@10 per task, ANN recall@10",
)
DETAILS = Artifact(
    "evaluate",
    "details.json",
    "every other test metric: recall@K, MRR, nDCG, queries, per query language, the "
    "frozen encoders, through the index, diagnostics",
)
CURVES = Artifact("evaluate", "recall_curves.json", "recall@K per task, model and frozen encoders")
GATES = Artifact(
    "evaluate", "gates.json", "each gate: metric, threshold, value, passed", local=True
)
CHAMPION = Artifact(
    "evaluate",
    "champion.json",
    "the champion compared with: which, its metrics, the difference with a CI (empty when none)",
    local=True,
)
PROFILE = Artifact(
    "evaluate",
    "profile.npy",
    "the catalog's profile: frozen features of a sample of listings (the drift test's)",
)
PROFILE_SAMPLE = Artifact(
    "evaluate",
    "profile_sample.npz",
    "the profile's listings (rows of the embed step's ids) and the id-hash threshold that "
    "sampled them: where the next refresh's profile starts from (io/catalog_profile.py)",
    local=True,  # a refresh's is carried from its release's
)
STALENESS = Artifact(
    "evaluate",
    "staleness.json",
    "a refresh's staleness: new share, drift, recall against training; stale or not",
    local=True,
)
EVALUATE_BASE = Artifact(
    "evaluate",
    "base",
    "a refresh's cache of the model's training release (its profile, fingerprints)",
    folder=True,
    persistent=True,
)
EXACT_TOP = Artifact(
    "evaluate",
    "exact_top.npz",
    "per test query its best listings and their scores, a margin deeper than the deepest "
    "K: where the next refresh's exact search starts from (components/core/carried_top.py)",
    local=True,  # a refresh's is carried from its release's
)
EVALUATE_BUILT_ON = Artifact(
    "evaluate",
    "built_on",
    "a refresh's cache of the release it builds on: its listing ids, exact top lists, "
    "profile and profile sample",
    folder=True,
    persistent=True,
)
RECALL_PLOT = Artifact(
    "evaluate", "recall_at_k.png", "recall@K per task, champion included, as a figure", local=True
)

# promote
RELEASE_MODEL = Artifact(
    "promote", "model.json", "the promoted model's registry reference", local=True
)


# What a consumer of a step's output reads together (the manifest says how it was made).
FEATURES = (VIEWS, FEATURE_STORE, manifest_of("featurize"))
TRAINED_MODEL = (SPLITS, MODEL_WEIGHTS, ACTIVATIONS, manifest_of("train"))
EMBEDDED = (EMBEDDINGS, EMBEDDED_IDS, manifest_of("embed"))
INDEXED = (INDEX, INDEX_DELTA, INDEX_IDS, manifest_of("index"))


@dataclass(frozen=True)
class Step:
    """A step: its CLI help, what it writes and reads. Its name is also its module, CLI
    command, params section, DVC stage, Airflow task, KFP component and output folder."""

    name: StepName
    help: str
    writes: tuple[Artifact, ...]
    reads: tuple[Artifact, ...] = ()

    @property
    def upstream(self) -> tuple[StepName, ...]:
        """The steps whose outputs this one reads, in pipeline order."""
        return tuple(step for step in STEP_ORDER if any(a.step == step for a in self.reads))

    @property
    def outputs(self) -> tuple[Artifact, ...]:
        """Everything it writes, its manifest included."""
        return (*self.writes, manifest_of(self.name))

    def reads_from(self, step: StepName) -> tuple[Artifact, ...]:
        return tuple(artifact for artifact in self.reads if artifact.step == step)


_STEPS = (
    Step(
        "catalog",
        "build the sample catalog from packaged emoji artwork",
        writes=(LISTINGS, QUERIES, IMAGES),
    ),
    Step(
        "validate",
        "validate listings, quarantine bad rows, write the clean set",
        writes=(
            CLEAN,
            QUARANTINE,
            CLEAN_QUERIES,
            QUARANTINED_QUERIES,
            VALIDATION_REPORT,
            IMAGE_CHECKS,
            LISTING_STATE,
        ),
        reads=(LISTINGS, QUERIES, IMAGES),
    ),
    Step(
        "featurize",
        "encode every view and query with frozen encoders (cached)",
        writes=(VIEWS, QUERY_FEATURES, SKIPPED_VIEWS, FEATURE_STORE, IMAGE_KEYS, VIEWS_INDEX),
        reads=(IMAGES, CLEAN, CLEAN_QUERIES, manifest_of("validate")),
    ),
    Step(
        "train",
        "train the multi-view model on cached features, track in MLflow",
        writes=(
            SPLITS,
            MODEL_WEIGHTS,
            MODEL_SPEC,
            HISTORY,
            TRAIN_METRICS,
            CHECKPOINTS,
            ACTIVATIONS,
        ),
        # the catalog's images only when fine-tuning the image backbone
        reads=(IMAGES, QUERY_FEATURES, *FEATURES),
    ),
    Step(
        "embed",
        "write one fused embedding per clean listing (streamed)",
        writes=(EMBEDDINGS, EMBEDDED_IDS, EMBED_SPLITS, MISSING, EMBED_BASE, PRINTS_INDEX),
        # the quarantine too: a removal holds while the catalog lists the listing at all
        reads=(IMAGES, CLEAN, QUARANTINE, *FEATURES, VIEWS_INDEX, *TRAINED_MODEL),
    ),
    Step(
        "index",
        "build the FAISS index of the listing embeddings",
        writes=(INDEX, INDEX_DELTA, INDEX_IDS, INDEX_CHANGES, INDEX_BASE),
        reads=EMBEDDED,
    ),
    Step(
        "evaluate",
        "recall on the test split, champion comparison, recall gates",
        writes=(
            METRICS,
            DETAILS,
            CURVES,
            PROFILE,
            GATES,
            CHAMPION,
            STALENESS,
            RECALL_PLOT,
            EXACT_TOP,
            PROFILE_SAMPLE,
            EVALUATE_BASE,
            EVALUATE_BUILT_ON,
        ),
        reads=(
            IMAGES,
            QUERY_FEATURES,
            *FEATURES,
            MODEL_WEIGHTS,  # a retrain's model (a refresh's comes from the registry)
            ACTIVATIONS,
            manifest_of("train"),
            *EMBEDDED,
            EMBED_SPLITS,  # the model's own test split
            *INDEXED,
        ),
    ),
    Step(
        "promote",
        "publish the gated index and model to production storage",
        writes=(RELEASE_MODEL,),
        reads=(
            manifest_of("validate"),
            manifest_of("featurize"),
            manifest_of("train"),
            *EMBEDDED,
            EMBED_SPLITS,
            *INDEXED,
            METRICS,
            DETAILS,
            PROFILE,
            GATES,
            CHAMPION,
            STALENESS,
            EXACT_TOP,
            PROFILE_SAMPLE,
            manifest_of("evaluate"),
        ),
    ),
)
STEPS: dict[StepName, Step] = {step.name: step for step in _STEPS}
if tuple(STEPS) != STEP_ORDER:  # pragma: no cover - a mistake in this file
    raise RuntimeError(f"contract: steps {tuple(STEPS)} are not in STEP_ORDER {STEP_ORDER}")

# What a production version holds (besides its own manifest): store name -> artifact.
# `embeddings/part-*.npy` are added part by part by the promote step.
RELEASE_FILES = (
    INDEX,
    INDEX_DELTA,
    INDEX_IDS,
    EMBEDDED_IDS,
    EMBED_SPLITS,  # a refresh evaluates on its model's splits
    METRICS,
    DETAILS,
    PROFILE,
    EXACT_TOP,  # where the next refresh's exact search starts from
    PROFILE_SAMPLE,  # ... and its profile
    GATES,
    RELEASE_MODEL,
    INDEX_CHANGES,
)
# stored with a version, not part of its content
RELEASE_REPORTS = (METRICS, DETAILS, GATES, INDEX_CHANGES)
