"""Typed configuration: params.yaml parsed once into frozen, strict models.

Every step receives its own section as an object; nothing else reads params.yaml.
`--set section.key=value` overrides are applied to the raw mapping before validation,
so an override gets exactly the same checks as the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from components.contract import Artifact, StepName

Vendor = Literal["twemoji", "openmoji", "noto"]
# A registered model: models:/<name>@<alias> or models:/<name>/<version>
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
CURRENT_CHAMPION = "current"  # evaluate.champion: the production store's CURRENT model
MANUAL = "manual"  # the trigger of a run that was not told why it runs (`trigger`)
AT_K = re.compile(r"_at_(\d+)\b")  # MLflow's spelling of `@K` in a metric name


class ConfigError(ValueError):
    """A params file or override is invalid; the message names the key."""


class Section(BaseModel):
    """Base of every params section: immutable, no unknown keys, no type coercion."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class PathsConfig(Section):
    workdir: str = Field("artifacts", description="Root of every step's output folder.")
    catalog: str | None = Field(
        None,
        description="Catalog to read (local dir or s3://bucket/prefix); "
        "null means the sample catalog built by the catalog step.",
    )


class StorageConfig(Section):
    uri: str | None = Field(
        None,
        description="Production store: a path, file:///abs/path or s3://bucket/prefix; "
        "null: <workdir>/production.",
    )
    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, Ceph, ...); null: AWS or AWS_ENDPOINT_URL_S3.",
    )
    region: str | None = Field(None, description="S3 region; null: boto3's configuration chain.")
    multipart_threshold_mb: int = Field(
        64, ge=5, description="Files from this size (MiB) upload in parallel multipart parts."
    )
    max_attempts: int = Field(
        8, ge=1, description="Tries per S3 request; throttling and 5xx retry with backoff."
    )
    timeout_s: float = Field(
        60.0,
        gt=0.0,
        description="Seconds an S3 request may wait for the server before it is retried "
        "(connecting: at most 10).",
    )


class CatalogConfig(Section):
    source: Literal["emoji", "icons"] = Field(
        "emoji",
        description="Sample catalog to build: emoji (several drawings per concept, queries "
        "in several languages) or icons (Font Awesome Free: mostly one drawing per icon, "
        "English search terms as queries; the emoji-only keys are ignored).",
    )
    max_listings: int | None = Field(
        None, ge=1, description="Keep at most this many listings (null: all); for tests."
    )
    vendors: list[Vendor] = Field(
        ["twemoji", "openmoji", "noto"],
        description="Image vendors, in view order; the first available one is the primary view.",
    )
    skin_tones: bool = Field(True, description="Add skin-tone variants as extra image views.")
    max_image_views: int = Field(8, ge=1, description="Cap on image views per listing.")
    image_size: int = Field(72, ge=16, le=512, description="Side in pixels of every image view.")
    query_fraction: float = Field(
        0.7,
        ge=0.0,
        le=1.0,
        description="Share of eligible alternate names held out of the text views as queries.",
    )
    query_languages: list[Literal["en", "es", "fr", "de", "it", "pt"]] = Field(
        ["en", "es", "fr"],
        description="Languages of the held-out queries; non-English ones are CLDR translations "
        "of the listing's name (text views stay English).",
    )
    optional_data_roots: list[str] = Field(
        ["/", ".cache/debian"],
        description="Roots searched for optional Debian data (CLDR annotations, Noto font); "
        "a relative root is taken from the project folder, not the current directory.",
    )


class ValidateConfig(Section):
    max_bad_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="Fail the run when more rows than this are quarantined."
    )
    allowed_schemes: list[str] = Field(
        ["file", "s3"], description="URI schemes allowed in image_uris (plain paths always are)."
    )
    allowed_buckets: list[str] | None = Field(
        None, description="Buckets allowed in s3:// image URIs; null allows any bucket."
    )
    min_image_side: int = Field(16, ge=1, description="Smallest allowed image width/height.")
    max_image_side: int = Field(8192, ge=1, description="Largest allowed image width/height.")
    max_image_bytes: int = Field(20_000_000, ge=1, description="Largest allowed image file.")
    max_image_frames: int = Field(
        1000, ge=1, description="Most frames an (animated) image may declare; the first is used."
    )
    decode_memory_mb: int = Field(
        512,
        ge=1,
        description="Cap on decoded pixels held at once by all image threads together: bounds "
        "memory whatever size the images claim (an image needing more is image_too_large).",
    )
    max_images: int = Field(64, ge=1, description="Most image views a listing may have.")
    max_listing_id_chars: int = Field(256, ge=1, description="Longest allowed listing_id.")
    max_title_chars: int = Field(500, ge=1, description="Longest allowed title.")
    max_description_chars: int = Field(50_000, ge=0, description="Longest allowed description.")
    max_category_chars: int = Field(500, ge=1, description="Longest allowed category path.")
    max_tags: int = Field(100, ge=0, description="Most tags a listing may have.")
    max_tag_chars: int = Field(200, ge=1, description="Longest allowed tag.")
    workers: int = Field(8, ge=1, description="Threads that open and decode images.")
    verify_content: bool = Field(
        True,
        description="Open and check every image. Off (a refresh): an image whose size and "
        "modification time (S3: size and ETag) are those it had when last checked keeps "
        "that verdict and its feature key without being read; featurize follows this.",
    )
    min_clean_listings: int = Field(
        10,
        ge=0,
        description="Fail when fewer listings than this are clean: too few to train on "
        "(a contrastive step needs other listings as negatives).",
    )
    require_eval_queries: bool = Field(
        True,
        description="Fail when no clean listing has a query (queries.parquet) or 3+ photos "
        "(one is held out as a query): train could not select a model and evaluate would "
        "have nothing to measure. false only to check a catalog's rows alone.",
    )


class FeaturizeConfig(Section):
    image_encoder: Literal["efficientnet-lite0", "efficientnet-lite2"] = Field(
        "efficientnet-lite0", description="Frozen image encoder (components/core/encoders.py)."
    )
    text_encoder: Literal["all-minilm-l6-v2", "use-multilingual-v3", "multilingual-e5-small"] = (
        Field(
            "use-multilingual-v3", description="Frozen text encoder (components/core/encoders.py)."
        )
    )
    image_size: int = Field(224, ge=32, le=1024, description="Encoder input side in pixels.")
    colour_histogram: int = Field(
        0,
        ge=0,
        le=256,
        description="Bins per channel of each photo's CIE L*u*v* colour histograms, appended "
        "to its image features (0: off; components/core/encoders.py).",
    )
    text_views: list[Literal["title", "description", "tags", "category"]] = Field(
        ["title", "description", "tags", "category"],
        description="Text columns that become text views, primary (title) first.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when a GPU is visible, else CPU."
    )
    image_batch_size: int = Field(16, ge=1, description="Images per encoder forward pass.")
    text_batch_size: int = Field(256, ge=1, description="Texts per encoder forward pass.")
    listings_per_chunk: int = Field(
        1024, ge=1, description="Listings read at a time; bounds memory at any catalog size."
    )
    shard_rows: int = Field(
        8192,
        ge=1,
        description="Most vectors per feature-store shard file (each chunk also ends one, "
        "so an interrupted run keeps every finished chunk's vectors).",
    )
    workers: int = Field(4, ge=1, description="Threads that read and decode images.")
    decode_memory_mb: int = Field(
        512,
        ge=1,
        description="Cap on decoded pixels held at once by the image threads (see validate).",
    )

    @field_validator("colour_histogram")
    @classmethod
    def _bins(cls, value: int) -> int:
        if value == 1:
            raise ValueError("a colour histogram needs 2 or more bins per channel (0: off)")
        return value


class OtRegularizerConfig(Section):
    weight: float = Field(
        0.0, ge=0.0, description="Weight of the transport regulariser (0: off; see objectives.py)."
    )
    epsilon: float = Field(0.05, gt=0.0, description="Entropic regulariser of the batch plan.")
    iterations: int = Field(30, ge=1, description="Sinkhorn iterations per step.")
    loop_weight: float = Field(
        1.0, ge=0.0, description="Weight of loop consistency relative to the identity term."
    )
    downweight: bool = Field(
        True,
        description="Scale each listing's contrastive terms by the plan mass on its own "
        "pair (likely misaligned listings count less).",
    )


class CorruptConfig(Section):
    swap_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Measurement only: this share of listings trains with another listing's "
        "primary photo (validation and test never see it).",
    )
    drop_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Measurement only: this share of listings trains without one modality "
        "(its photos or its texts, at random).",
    )


class DistillConfig(Section):
    weight: float = Field(
        0.0,
        ge=0.0,
        description="Weight of the KL term toward the EMA teacher (0: off; see "
        "components/core/distillation.py).",
    )
    momentum: float = Field(
        0.995, ge=0.0, lt=1.0, description="EMA momentum of the teacher, per optimiser step."
    )
    temperature: float = Field(
        0.05, gt=0.0, description="Softmax temperature of both similarity distributions."
    )


class TrainConfig(Section):
    objective: Literal["factorized", "single_view", "pairwise", "sinkhorn"] = Field(
        "factorized", description="Alignment objective (components/core/objectives.py)."
    )
    dim: int = Field(256, ge=2, description="Dimension of the shared embedding space.")
    adapter: Literal["mlp", "residual"] = Field(
        "residual",
        description="mlp: adapters from scratch; residual: a linear skip started from the "
        "frozen encoders' geometry (text principal directions, photos regressed onto titles) "
        "plus an MLP that starts at zero.",
    )
    hidden: int = Field(1024, ge=1, description="Hidden width of each adapter MLP.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Adapter dropout.")
    alpha: float = Field(
        0.5, gt=0.0, le=1.0, description="Marginal weight of the primary view per modality."
    )
    aux_samples: int = Field(
        2, ge=0, description="factorized: auxiliary views sampled per modality per step (k)."
    )
    image_share: float = Field(
        0.5, ge=0.0, le=1.0, description="Weight of the image mean in the fused embedding."
    )
    fusion: Literal["mean", "barycenter"] = Field(
        "mean",
        description="How views fuse into the listing embedding: the normalised weighted mean, "
        "or their weighted barycenter on the sphere (components/core/model.py).",
    )
    temperature: float = Field(0.07, gt=0.0, description="Initial softmax temperature.")
    learn_temperature: bool = Field(True, description="Learn the temperature (else fixed).")
    sinkhorn_epsilon: float = Field(0.05, gt=0.0, description="sinkhorn: entropic regulariser.")
    sinkhorn_iterations: int = Field(20, ge=1, description="sinkhorn: iterations per step.")
    max_views: int = Field(
        16, ge=1, description="pairwise/sinkhorn: cap on views per modality per listing."
    )
    batch_size: int = Field(256, ge=2, description="Listings per step (per process).")
    epochs: int = Field(40, ge=1, description="Most epochs to train.")
    lr: float = Field(3e-4, gt=0.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay.")
    warmup_epochs: float = Field(1.0, ge=0.0, description="Linear warm-up, then cosine decay.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Max gradient norm (null: off).")
    patience: int = Field(
        6, ge=1, description="Stop after this many epochs without a better val recall@10."
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of queries for val.")
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Share of queries for test.")
    finetune_blocks: int = Field(
        0,
        ge=0,
        description="Fine-tune the last N blocks of the image backbone from the catalog's "
        "photos (0: train on the cached frozen features). Meant for GPU.",
    )
    finetune_lr: float = Field(
        1e-4, gt=0.0, description="Peak learning rate of the fine-tuned backbone blocks."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if visible.")
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU).")
    ks: list[int] = Field([1, 10, 50], description="Recall@K cut-offs reported on val.")
    ot_regularizer: OtRegularizerConfig = OtRegularizerConfig()
    distill: DistillConfig = DistillConfig()
    corrupt: CorruptConfig = CorruptConfig()


class EmbedConfig(Section):
    model: str | None = Field(
        None,
        description="Model to embed with: null takes the train step's output; else a "
        "registry URI such as models:/listing-encoder@champion or models:/listing-encoder/3.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if visible.")
    batch_size: int = Field(1024, ge=1, description="Listings per forward pass.")
    reuse_current: bool = Field(
        False,
        description="A refresh: embed with the production store's current release's model, "
        "and take that release's vector for every listing whose views did not change.",
    )
    compact_above: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="A refresh appends its new and changed listings to the release's "
        "embedding parts and deletes the rows they replace; once more than this fraction of "
        "the rows stored would be deleted, it writes every live row anew instead.",
    )

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        return value if value is None else _model_uri(value, ())

    @model_validator(mode="after")
    def _one_model(self) -> EmbedConfig:
        if self.reuse_current and self.model is not None:
            raise ValueError(
                "embed.reuse_current embeds with the current release's model: leave "
                f"embed.model null (it is {self.model!r})"
            )
        return self


class IndexConfig(Section):
    factory: str = Field(
        "Flat",
        description="FAISS index_factory string: Flat (exact), IVF{n},PQ{m}, HNSW32, ...",
    )
    nprobe: int | None = Field(
        None, ge=1, description="IVF lists searched per query (null: faiss's default, 1)."
    )
    ef_search: int | None = Field(
        None, ge=1, description="HNSW search breadth (null: faiss's default, 16)."
    )
    refine_k_factor: int | None = Field(
        None,
        ge=1,
        description="A factory ending in Refine(...): re-rank this many times k candidates "
        "with the refine vectors (null: faiss's default, 1).",
    )
    train_sample: int = Field(
        100_000, ge=1, description="Most vectors sampled to train IVF/PQ types."
    )
    gpu: Literal["auto", "always", "never"] = Field(
        "auto", description="Build on GPU: auto when faiss sees one; always fails without."
    )
    update_current: bool = Field(
        False,
        description="A refresh: update the index of the release the embed step built on "
        "(remove the listings that left or changed, add the new and changed) instead of "
        "building one.",
    )
    max_delta: float = Field(
        0.2,
        ge=0.0,
        description="A refresh builds in full when the listings added, changed and removed "
        "pass this share of the release's.",
    )
    compact_above: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="A refresh keeps the release's index file and writes its new and "
        "changed vectors to a delta beside it; once the delta's vectors and the index's "
        "vectors no longer live pass this share of the index, it writes the index whole "
        "again (the delta empty).",
    )
    max_imbalance: float = Field(
        3.0,
        ge=1.0,
        description="A refresh builds in full when an IVF index's lists would be more "
        "unbalanced than this (faiss's imbalance factor; 1.0 is even): its coarse quantizer "
        "is never retrained in place.",
    )


class GatesConfig(Section):
    min: dict[str, float] = Field(
        {"query_to_listing/recall@10": 0.3, "view_to_listing/recall@10": 0.3},
        description="Metric -> lowest allowed value (keys as in the evaluate step's "
        "metrics.json or details.json).",
    )
    max_regression: dict[str, float] = Field(
        {"query_to_listing/recall@10": 0.03, "view_to_listing/recall@10": 0.03},
        description="Metric -> largest allowed drop below the champion's value.",
    )
    min_gain_over_frozen: dict[str, float] = Field(
        {"query_to_listing": 0.02, "view_to_listing": 0.02},
        description="Task -> smallest relative gain of recall@10 over the frozen encoders' "
        "best no-training baseline (0.02: at least 2% better).",
    )
    min_queries: int = Field(
        30,
        ge=1,
        description="A gate on a task with fewer test queries than this is skipped: too few "
        "to judge (the metrics are still reported).",
    )
    max_ann_loss: float | None = Field(
        0.02,
        ge=0.0,
        description="Largest allowed drop of recall@10 through the index vs exact search "
        "(null: no gate).",
    )

    @field_validator("min", "max_regression")
    @classmethod
    def _file_keys(cls, gates: dict[str, float]) -> dict[str, float]:
        """A gate's metric as the steps' files name it: a key typed as MLflow shows it
        (`recall_at_10`, MLflow refusing `@`: components/release/tracking.py metric_name)
        is read as the same metric (`recall@10`)."""
        return {AT_K.sub(r"@\1", key): value for key, value in gates.items()}


class StalenessConfig(Section):
    """When a refresh says the model is stale (components/release/staleness.py)."""

    max_new_share: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="Stale when more than this share of today's listings is new or changed "
        "since the model's training catalog.",
    )
    drift_alpha: float = Field(
        0.01,
        gt=0.0,
        lt=1.0,
        description="Stale when the drift test of today's listings against the training "
        "catalog gives a p-value below this (a false alarm once in 1/alpha refreshes).",
    )
    max_recall_drop: float = Field(
        0.03,
        ge=0.0,
        description="Stale when a task's recall@10 fell more than this below its value at "
        "training.",
    )
    profile_listings: int = Field(
        1000,
        ge=10,
        description="Listings sampled (by a hash of their id) for the catalog's profile, "
        "which the drift test compares.",
    )
    permutations: int = Field(
        500, ge=20, description="Relabellings in the drift test's permutation p-value."
    )


class EvaluateConfig(Section):
    champion: str | None = Field(
        "current",
        description="The model to compare with: current (the production store's CURRENT "
        "version), a models:/ URI, or null (none). No champion before the first promotion.",
    )
    ks: list[int] = Field(
        [1, 10, 50, 100, 500], description="Recall@K cut-offs (capped at the catalog size)."
    )
    bootstrap: int = Field(
        1000, ge=10, description="Bootstrap resamples for the champion comparison's CI."
    )
    diagnostics: bool = Field(
        True,
        description="Report the diagnostics (modality gap, alignment, uniformity, recall under "
        "other scorings); a refresh leaves them out: its model is the release's, measured.",
    )
    diagnostics_sample: int = Field(
        1000, ge=10, description="Views per modality (and listings) sampled for diagnostics."
    )
    latency_queries: int = Field(
        500, ge=1, description="Queries searched one at a time to measure index latency."
    )
    ann_queries: int | None = Field(
        None,
        ge=1,
        description="Test queries per task searched through the index for its recall and the "
        "ANN check, evenly spaced in the task's order (a fixed sample); null: every one. A "
        "refresh sets 256: through a Flat index each query scans every listing.",
    )
    latency_seconds: float = Field(
        5.0,
        gt=0,
        description="Time budget of the latency measurement: it stops after this many "
        "seconds of searching (at least 10 queries), so an exhaustive index over millions of "
        "listings does not make evaluate minutes longer.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if visible.")
    gates: GatesConfig = GatesConfig()
    staleness: StalenessConfig = StalenessConfig()

    @field_validator("champion")
    @classmethod
    def _champion(cls, value: str | None) -> str | None:
        if value is None or value == CURRENT_CHAMPION:
            return value
        return _model_uri(value, (CURRENT_CHAMPION,))


def _model_uri(value: str, words: tuple[str, ...]) -> str:
    """`value` when it is a registry URI; else an error listing what the key takes (a
    misspelt choice must never read as "no model", so nothing is guessed)."""
    if MODEL_URI.match(value):
        return value
    hint = ""
    if value.strip().lower() in {"none", "null", "nil", "~", ""}:
        hint = "; to say none, write null unquoted (YAML's null), not a string"
    elif close := difflib.get_close_matches(value, words, n=1, cutoff=0.6):
        hint = f"; did you mean {close[0]!r}?"
    choices = ", ".join([*words, "null"])
    raise ValueError(
        f"{value!r} is not one of {choices} or a registry URI (models:/<name>@<alias> or "
        f"models:/<name>/<version>){hint}"
    )


class RegistryConfig(Section):
    model_name: str = Field(
        "listing-encoder",
        description="Registered model in MLflow: train registers versions of it, promote "
        "and rollback move its aliases.",
    )
    challenger_alias: str = Field(
        "challenger",
        description="Alias train sets on a new version (gates pending); promote takes it off "
        "the version it promotes.",
    )
    champion_alias: str = Field(
        "champion", description="Alias promote moves to the promoted version."
    )


class PromoteConfig(Section):
    retain: int = Field(
        10,
        ge=2,
        description="Versions kept in the store; older ones are deleted, never the current "
        "one or the one before it.",
    )
    abandoned_after_hours: float = Field(
        24.0,
        ge=0.0,
        description="Incomplete versions (an upload that died) older than this are deleted.",
    )
    max_shrink: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Refuse a release with this fraction fewer listings than the current "
        "one (a truncated upstream export is not a release).",
    )
    allow_shrink: bool = Field(
        False, description="Promote a planned shrink beyond max_shrink (recorded as such)."
    )


class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="Address the search service listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Its port.")
    poll_s: float = Field(
        10.0, gt=0.0, description="Seconds between checks of the store's CURRENT pointer."
    )
    catalog: str | None = Field(
        None,
        description="Catalog whose titles and photos the results show (a local dir or "
        "s3://...); null: paths.catalog.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Query encoders' device.")
    max_k: int = Field(100, ge=1, description="Most results one request may ask for.")
    max_query_chars: int = Field(500, ge=1, description="Longest text query accepted.")
    max_upload_mb: float = Field(10.0, gt=0.0, description="Largest photo upload accepted.")
    decode_memory_mb: int = Field(
        256, ge=1, description="Decoded pixels of uploads held at once (see validate)."
    )
    facet_hits: int = Field(
        100,
        ge=0,
        le=1000,
        description="Top hits of a search (without its filter) whose top-level categories "
        "its facets count (0: no facets).",
    )
    max_filter_values: int = Field(
        20, ge=1, description="Most category values one request may filter by."
    )
    overfetch_min_share: float = Field(
        0.25,
        gt=0.0,
        le=1.0,
        description="A filter keeping at least this share of the listings over-fetches "
        "from the unfiltered index; a more selective one searches only its listings.",
    )
    max_photo_queue: int = Field(
        8,
        ge=1,
        description="Most photo searches waiting or being encoded at once; past it a photo "
        "search is answered 503 with Retry-After (a photo costs ~30 ms of a core).",
    )
    photo_encoder: Literal["process", "thread"] = Field(
        "process",
        description="Where photo queries are encoded: a child process of their own (text "
        "searches never wait for them), or a thread of the service's process.",
    )
    photo_priority: Literal["idle", "low", "normal"] = Field(
        "normal",
        description="The photo encoder's scheduling priority against text searches: normal "
        "(the same; photo_share bounds it), low (nice +10), idle (Linux SCHED_IDLE: only CPU "
        "time nothing else wants; on busy cores photos then wait seconds).",
    )
    photo_share: float = Field(
        0.15,
        gt=0.0,
        le=1.0,
        description="While the service answers other requests, the photo encoder process "
        "encodes at most this share of one core's time, pausing between the model's layers "
        "(1: no bound); with nothing else in flight it runs at full speed. The process "
        "encoder's alone (photo_encoder: thread has no bound).",
    )
    photo_warm: bool = Field(
        True,
        description="Start the photo encoder process, with the served model, when the "
        "service starts (false: on the first photo search, whose start, ~1.5 s of a core, "
        "then runs beside text searches; no memory for it until a photo is searched).",
    )


# minutes a step may run on an orchestrator before it is stopped (the steps never read it)
STEP_TIMEOUT_MINUTES: dict[str, float] = {
    "catalog": 30,
    "validate": 60,
    "featurize": 240,
    "train": 480,
    "embed": 120,
    "index": 120,
    "evaluate": 60,
    "promote": 30,
}


class AirflowConfig(Section):
    schedule: str | None = Field(
        "0 3 * * 0", description="Cron schedule of the retraining DAG (null: manual only)."
    )
    refresh_schedule: str | None = Field(
        "0 * * * *",
        description="Cron schedule of the refresh DAG (null: manual only): new and changed "
        "listings searchable within this period; the retrain DAG starts when it says stale.",
    )
    retries: int = Field(2, ge=0, description="Retries of a failed task (not of a failed gate).")
    retry_delay_minutes: float = Field(10.0, ge=0.0, description="Wait before a retry.")
    timeout_minutes: dict[StepName, float] = Field(
        STEP_TIMEOUT_MINUTES, description="Execution timeout of each step's task."
    )
    tags: list[str] = Field(["listing-embeddings", "retrain", "ml"], description="DAG tags.")
    mode: Literal["local", "kubernetes"] = Field(
        "local",
        description="local: tasks run the steps in the worker; kubernetes: one pod per step. "
        "The Airflow Variable listing_embeddings_mode (AIRFLOW_VAR_...) overrides it.",
    )


class KubeflowConfig(Section):
    retries: int = Field(2, ge=0, description="Retries of a failed component.")
    timeout_minutes: dict[StepName, float] = Field(
        STEP_TIMEOUT_MINUTES, description="Timeout of each step's component."
    )
    uncached_steps: list[StepName] = Field(
        ["evaluate", "promote"],
        description="Steps KFP never serves from its cache (they read the production store).",
    )


class Toleration(Section):
    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


class KubernetesConfig(Section):
    image: str = Field(
        "registry.example.com/listing-embeddings:latest",
        description="The project image (infra/Dockerfile) every step's pod runs.",
    )
    namespace: str = Field("listing-embeddings", description="Namespace of the step pods.")
    service_account: str = Field(
        "listing-embeddings", description="Pods' service account (its role grants S3 access)."
    )
    work_volume_claim: str = Field(
        "listing-embeddings-work", description="PVC mounted at /work: the steps' workdir."
    )
    params_config_map: str = Field(
        "listing-embeddings-params", description="ConfigMap with params.yaml, mounted read-only."
    )
    gpu_steps: list[StepName] = Field(
        ["featurize", "train", "embed"], description="Steps that request GPUs."
    )
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource of a GPU.")
    gpus: int = Field(1, ge=1, description="GPUs per GPU step's pod.")
    gpu_node_selector: dict[str, str] = Field(
        {"node-pool": "gpu"}, description="Node labels of the GPU node pool."
    )
    gpu_tolerations: list[Toleration] = Field(
        [Toleration(key="nvidia.com/gpu")], description="Tolerations for the GPU nodes' taints."
    )
    cpu_node_selector: dict[str, str] = Field(
        {"node-pool": "cpu"}, description="Node labels for the CPU steps."
    )
    cpu: dict[str, str] = Field(
        {"cpu": "2", "memory": "8Gi"}, description="Requests of every step's container."
    )
    gpu_step_resources: dict[str, str] = Field(
        {"cpu": "8", "memory": "48Gi"}, description="Requests of a GPU step's container."
    )
    train_nodes: int = Field(
        1,
        ge=1,
        description="Nodes the train step spans in kubernetes mode: > 1 runs it as a Kubeflow "
        "Training Operator PyTorchJob (torchrun, elastic, `gpus` processes per node).",
    )
    train_min_nodes: int = Field(
        1, ge=1, description="Fewest nodes the elastic PyTorchJob keeps training with."
    )
    train_max_restarts: int = Field(
        3, ge=0, description="Restarts of the whole PyTorchJob group after a node fails."
    )
    env: dict[str, str] = Field(
        {}, description="Extra environment (e.g. MLFLOW_TRACKING_URI); never credentials."
    )


class OrchestrationConfig(Section):
    shards: int = Field(
        1,
        ge=1,
        description="featurize and embed run as this many shards side by side (Airflow mapped "
        "tasks, a Kubeflow ParallelFor), then a gather (components/core/shards.py).",
    )
    airflow: AirflowConfig = AirflowConfig()
    kubeflow: KubeflowConfig = KubeflowConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()


class Params(Section):
    seed: int = Field(0, description="Seed for every random choice of every step.")
    trigger: str | None = Field(
        None,
        description=(
            "Why this run: recorded in the training and evaluation runs (MLflow tag "
            "`trigger`), the release's manifest and `versions`. The Airflow DAGs set it "
            "(schedule, manual, staleness: <reasons>); null: manual. Quote text with a "
            "colon: --set 'trigger=\"staleness: drift\"'."
        ),
    )
    paths: PathsConfig = PathsConfig()
    catalog: CatalogConfig = CatalogConfig()
    # `validate` would shadow BaseModel.validate; the alias keeps the YAML key.
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    featurize: FeaturizeConfig = FeaturizeConfig()
    train: TrainConfig = TrainConfig()
    embed: EmbedConfig = EmbedConfig()
    index: IndexConfig = IndexConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    promote: PromoteConfig = PromoteConfig()
    storage: StorageConfig = StorageConfig()
    registry: RegistryConfig = RegistryConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    serve: ServeConfig = ServeConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    def section(self, name: str) -> Section:
        """A section by its params.yaml name (the name a step receives it under)."""
        for field_name, field in type(self).model_fields.items():
            if (field.alias or field_name) == name:
                return getattr(self, field_name)
        raise ConfigError(f"unknown params section '{name}'")


SECTIONS: dict[str, type[Section]] = {
    "paths": PathsConfig,
    "catalog": CatalogConfig,
    "validate": ValidateConfig,
    "featurize": FeaturizeConfig,
    "train": TrainConfig,
    "embed": EmbedConfig,
    "index": IndexConfig,
    "evaluate": EvaluateConfig,
    "promote": PromoteConfig,
    "storage": StorageConfig,
    "registry": RegistryConfig,
    "orchestration": OrchestrationConfig,
    "serve": ServeConfig,
}


@dataclass(frozen=True)
class StepPaths:
    """What every step shares: where it reads and writes (`<workdir>/<step>/`), the
    catalog it reads, where MLflow and the production store are, the registered model's
    name and aliases, the run's seed and why it runs (`trigger`)."""

    workdir: Path
    catalog: str
    tracking_uri: str | None = None
    seed: int = 0
    trigger: str = MANUAL
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)
    registry: RegistryConfig = dataclasses.field(default_factory=RegistryConfig)

    @classmethod
    def from_params(cls, params: Params, tracking_uri: str | None = None) -> StepPaths:
        """The shared settings of `params`; `tracking_uri` is MLFLOW_TRACKING_URI, read by
        the caller at the edge (None: a sqlite file in the work dir).

        Raises:
            ConfigError: `paths.workdir` exists and is not a folder.
        """
        workdir = Path(params.paths.workdir)
        if workdir.exists() and not workdir.is_dir():
            raise ConfigError(f"paths.workdir {str(workdir)!r} is a file, not a folder")
        return cls(
            workdir=workdir,
            catalog=params.paths.catalog or str(workdir / "catalog"),
            tracking_uri=tracking_uri,
            seed=params.seed,
            trigger=params.trigger or MANUAL,
            storage=params.storage,
            registry=params.registry,
        )

    @property
    def mlflow_uri(self) -> str:
        """MLFLOW_TRACKING_URI as given, else a sqlite file in the work dir."""
        return self.tracking_uri or f"sqlite:///{(self.workdir / 'mlflow.db').resolve()}"

    def step_dir(self, step: StepName) -> Path:
        return self.workdir / step

    def path(self, artifact: Artifact) -> Path:
        """Where `artifact` is in this run's work dir."""
        return artifact.path(self.workdir)

    @property
    def storage_uri(self) -> str:
        """`storage.uri`, or the local store `<workdir>/production` when it is null."""
        return self.storage.uri or str(self.workdir / "production")


def load_params(path: Path | str | None = None, overrides: list[str] | None = None) -> Params:
    """Read params.yaml (or defaults when `path` is None), apply overrides, validate.

    Raises:
        ConfigError: unreadable file, bad override syntax, unknown key or wrong type;
            the message names the file or the dotted key.
    """
    raw = _read_yaml(Path(path)) if path is not None else {}
    for override in overrides or []:
        _apply_override(raw, override)
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe_errors(err, raw)) from None


class ParamsLoader(yaml.SafeLoader):
    """YAML with the scalars of YAML 1.2's core schema, the way DVC reads params.yaml and
    people write numbers: `3e-4` and `1e-3` are floats, `1_000` is 1000, `010` is 10 (not
    octal 8: octal is `0o10`), only true/false are booleans (`yes`, `no`, `on`, `off`
    stay strings) and nothing becomes a date."""


_YAML11_SCALARS = {f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "timestamp")}
ParamsLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML11_SCALARS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_DIGITS = "-+0123456789"
for _tag, _pattern, _first in (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("int", r"^[-+]?(?:[0-9][0-9_]*|0o[0-7][0-7_]*|0x[0-9a-fA-F][0-9a-fA-F_]*)$", _DIGITS),
    (
        "float",
        r"^[-+]?(?:(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"
        r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$",
        _DIGITS + ".",
    ),
):
    ParamsLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), _first)


def _yaml12_int(loader: ParamsLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
    base = {"0o": 8, "0x": 16}.get(digits[:2], 10)
    return sign * int(digits[2:] if base != 10 else digits, base)


def _yaml12_float(loader: ParamsLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).replace("_", "").lower()
    return float(text.replace(".inf", "inf").replace(".nan", "nan"))


ParamsLoader.add_constructor("tag:yaml.org,2002:int", _yaml12_int)
ParamsLoader.add_constructor("tag:yaml.org,2002:float", _yaml12_float)


def parse_yaml(text: str) -> Any:
    """`text` read with `ParamsLoader`: params.yaml and every `--set` value."""
    return yaml.load(text, Loader=ParamsLoader)


# the overrides that make the steps a refresh (components/refresh.py; the DAG and the
# Kubeflow pipeline pass them, `refresh --help` shows them)
REFRESH = (
    "validate.verify_content=false",  # unchanged images keep their verdicts and keys
    "embed.reuse_current=true",
    "index.update_current=true",
    "evaluate.diagnostics=false",  # the release's model, measured when it was trained
    "evaluate.latency_seconds=1.0",  # a second of one-query searches (10 at least)
    "evaluate.ann_queries=256",  # the ANN check on a fixed sample of each task's queries
)


def with_overrides(params: Params, overrides: list[str] | tuple[str, ...]) -> Params:
    """`params` with more `section.key=value` overrides, checked like `--set`'s."""
    raw = params.model_dump(mode="json", by_alias=True)
    for override in overrides:
        _apply_override(raw, override)
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe_errors(err, raw)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"params file {path}: cannot read ({err.strerror})") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"params file {path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"params file {path}: top level must be a mapping of sections")
    return data


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected section.key=value")
    try:
        value = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise ConfigError(f"override {override!r}: '{prefix}' is not a section")
        node = child
    node[parts[-1]] = value


def _describe_errors(err: ValidationError, raw: dict[str, Any]) -> str:
    lines = []
    for error in err.errors():
        key = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'{_suggestion(error['loc'])}")
        else:
            lines.append(f"key '{key}': {error['msg']} (got {error.get('input')!r})")
    return "invalid params: " + "; ".join(lines)


def _suggestion(loc: tuple[Any, ...]) -> str:
    """Did-you-mean hint for an unknown key: a close name in the same place, else the
    same name in another section (`workdir` -> `paths.workdir`)."""
    if len(loc) == 1:
        known = ["seed", *SECTIONS]
    else:
        model = _nested_model(loc[:-1])
        known = list(model.model_fields) if model is not None else []
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if close:
        return f" (did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?)"
    elsewhere = [
        f"{name}.{loc[-1]}" for name, section in SECTIONS.items() if loc[-1] in section.model_fields
    ]
    return f" (did you mean {' or '.join(repr(key) for key in elsewhere)}?)" if elsewhere else ""


def _nested_model(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config model at `path` (a section, then nested models: `evaluate.gates`)."""
    model = SECTIONS.get(str(path[0]))
    for part in path[1:]:
        field = model.model_fields.get(str(part)) if model is not None else None
        annotation = field.annotation if field is not None else None
        is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        model = annotation if is_model else None
    return model


def describe_section(
    section: type[Section], prefix: str = "", fixed: dict[str, str] | None = None
) -> str:
    """One line per key of a section: name, type, default, meaning; for --help. A nested
    section lists its own keys (`gates.min`, ...); a key in `fixed` (`prefix` + name ->
    value) says the command sets it."""
    rows = []
    for name, field in section.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, Section):
            rows.append(describe_section(kind, f"{prefix}{name}.", fixed))
            continue
        default = f"default {field.default!r}"
        if fixed and f"{prefix}{name}" in fixed:
            default = f"this command sets {fixed[prefix + name]}"
        rows.append(f"  {prefix}{name} ({_type_name(kind)}, {default}): {field.description}")
    return "\n".join(rows)


def describe_top_level() -> str:
    """One line per top-level key of params.yaml (seed, trigger), as `describe_section`."""
    return "\n".join(
        f"  {name} ({_type_name(field.annotation)}, default {field.default!r}): {field.description}"
        for name, field in Params.model_fields.items()
        if (field.alias or name) not in SECTIONS
    )


def _type_name(annotation: Any) -> str:
    return (getattr(annotation, "__name__", None) or str(annotation)).replace("typing.", "")


def params_reference() -> str:
    """docs/params.md: every key of params.yaml with its type, default and meaning, from
    the config models (`make params-doc` writes it; a test keeps it current)."""
    lines = [
        "# Params reference",
        "",
        "Every key of `params.yaml`, generated from the config models in "
        "`components/config.py` by `make params-doc` (tests/test_params_doc.py fails when "
        "this page is out of date). Override any key for one run with "
        "`--set section.key=value`; values are YAML 1.2 (`3e-4`, `1_000`, `null`, `true`).",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
        *[
            _reference_row(name, field)
            for name, field in Params.model_fields.items()
            if (field.alias or name) not in SECTIONS  # the top-level keys: seed, trigger
        ],
    ]
    for name, section in SECTIONS.items():
        lines += [f"| **{name}** | | | |", *_reference_rows(section, name)]
    return "\n".join(lines) + "\n"


def _reference_rows(section: type[Section], prefix: str) -> list[str]:
    rows = []
    for name, field in section.model_fields.items():
        key = f"{prefix}.{name}"
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            rows += _reference_rows(field.annotation, key)
            continue
        rows.append(_reference_row(key, field))
    return rows


def _reference_row(key: str, field: FieldInfo) -> str:
    shown = json.dumps(field.default, default=lambda v: v.model_dump())
    meaning = (field.description or "").replace("|", "\\|")
    return f"| `{key}` | {_type_text(field.annotation)} | `{shown}` | {meaning} |"


def _type_text(annotation: Any) -> str:
    """A type as the reference table shows it: `int or null`, `one of a, b`, `list of str`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_text(a) for a in args)
    if origin is list:
        return f"list of {_type_text(args[0])}"
    if origin is dict:
        return f"map of {_type_text(args[0])} to {_type_text(args[1])}"
    return _type_name(annotation)
