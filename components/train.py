"""`train` step: fit the multi-view model on cached features with the chosen objective.

Deterministic given `seed` (on CPU). Writes to `<workdir>/train/`: `splits.parquet` (before
any training), `checkpoints/` every epoch (a rerun resumes from it; components/io/checkpoints.py),
`model.pt` (the best epoch by validation recall), `history.json`, and the manifest.
Early stopping and model selection use the validation split only, never the test split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from components.config import CorruptConfig, StepPaths, TrainConfig
from components.contract import (
    ACTIVATIONS,
    CHECKPOINTS,
    HISTORY,
    MODEL_SPEC,
    MODEL_WEIGHTS,
    SPLITS,
    STEPS,
    TRAIN_METRICS,
)
from components.core import distributed, encoders
from components.core.batching import (
    ListingViews,
    drop_modalities,
    fuse_listings,
    pad_views,
    swap_primary_photos,
)
from components.core.distillation import DistillationLoss, EmaTeacher
from components.core.encoders import autocast, pick_device
from components.core.model import ListingModel, Views, init_residual
from components.core.objectives import Batch, TransportRegularizer, build_objective
from components.core.retrieval import TASKS, evaluate_tasks, present
from components.io import activations, atomic, checkpoints
from components.io.manifest import (
    Timer,
    describe_files,
    read_manifest,
    read_run,
    unchanged_manifest,
    write_manifest,
)
from components.io.progress import progress
from components.io.training_data import TrainingData, load_training_data
from components.release import serving, tracking

STEP = STEPS["train"]
OUTPUTS = tuple(a.name for a in (SPLITS, MODEL_WEIGHTS, MODEL_SPEC, HISTORY, TRAIN_METRICS))
EMBED_BATCH = 1024

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    best: dict
    summary: str


def run(config: TrainConfig, paths: StepPaths) -> TrainResult:
    """Train on `<workdir>/featurize`; under torchrun every rank trains on its share of
    each global batch and only rank 0 writes files and talks to MLflow."""
    timer = Timer()
    torch.manual_seed(paths.seed)
    featurize_dir = paths.step_dir("featurize")
    features_manifest = read_manifest(featurize_dir)
    out = paths.step_dir(STEP.name)
    paths.path(CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    paths.path(ACTIVATIONS).mkdir(exist_ok=True)
    data = load_training_data(
        featurize_dir, features_manifest, config.val_fraction, config.test_fraction
    )
    device = distributed.init_if_launched(config.device != "cpu") or pick_device(config.device)
    tail = None
    if config.finetune_blocks:
        encoder = activations.image_encoder(
            encoder_spec(features_manifest), config.finetune_blocks, device
        )
        data = activations.with_activations(data, encoder, paths.catalog, paths.path(ACTIVATIONS))
        tail = encoder.tail()
    if not present(data.tasks("val")):
        raise ValueError(
            "train: the validation split has no queries and no held-out photos, so no model "
            "can be selected: add queries.parquet to the catalog, photos (3+ per listing), or "
            "raise train.val_fraction"
        )
    main = distributed.is_main()
    if not main:
        logging.getLogger("components").setLevel(logging.WARNING)  # rank 0 speaks
    else:
        atomic.write_table(data.splits, paths.path(SPLITS))
    log.info(
        "train: %d listings, queries train/val/test %d/%d/%d, held-out views val/test %d/%d",
        len(data.listing_ids),
        *(len(data.queries[s].relevant) for s in ("train", "val", "test")),
        len(data.held_out_views["val"].relevant),
        len(data.held_out_views["test"].relevant),
    )
    train_views = corrupted(data, config.corrupt, paths.seed)
    model = build_model(config, dataclasses.replace(data, **train_views), tail)
    model = model.to(device)
    lineage = {"featurize": features_manifest["outputs"], "seed": paths.seed, "code": code_hash()}
    trainer = Trainer(config, data, model, device, paths.seed, train_views)
    start_epoch = trainer.resume(paths.path(CHECKPOINTS), lineage)
    if trainer.finished and (done := _already_recorded(out, config, lineage)) is not None:
        log.info("%s", done.summary)
        return done
    tracked = tracking.training_run if main else tracking.no_run
    with tracked(paths, config, features_manifest, resumed=start_epoch > 0) as run_:
        history = trainer.fit(start_epoch, out, run_)
        if main:  # also when a resumed run had no epoch left (DVC removes outputs first)
            _save_weights(trainer.best_state, paths.path(MODEL_WEIGHTS))
        best = max(history, key=lambda h: h["val/score"])
        summary = (
            f"train: {config.objective} on {device} x{distributed.world_size()}, best epoch "
            f"{best['epoch']} of {len(history)}: val recall@10 {best['val/score']:.3f} "
            f"({_per_task(best)}), {trainer.seconds_per_step * 1000:.0f} ms/step"
        )
        if main:
            _record(config, paths, data, features_manifest, lineage, history, run_, timer, summary)
    log.info("%s", summary)
    return TrainResult(out_dir=out, best=best, summary=summary)


def corrupted(data: TrainingData, corrupt: CorruptConfig, seed: int) -> dict:
    """The views training batches use: the data's own, or with `train.corrupt`'s
    measurement-only damage (swapped primary photos, a lost modality); validation and
    test always use the data's. A dict of the TrainingData fields that differ."""
    if not corrupt.swap_fraction and not corrupt.drop_fraction:
        return {}
    rng = np.random.default_rng(seed)
    images, texts = data.images, data.texts
    if corrupt.swap_fraction:
        images = swap_primary_photos(images, corrupt.swap_fraction, rng)
        log.warning(
            "train: %.0f%% of listings train with another listing's primary photo "
            "(train.corrupt.swap_fraction)",
            100 * corrupt.swap_fraction,
        )
    if corrupt.drop_fraction:
        images, texts = drop_modalities(images, texts, corrupt.drop_fraction, rng)
        log.warning(
            "train: %.0f%% of listings train without their photos or their texts "
            "(train.corrupt.drop_fraction)",
            100 * corrupt.drop_fraction,
        )
    return {"images": images, "texts": texts}


# the modules that decide what training computes: a checkpoint made by other code is not
# resumed (paths relative to the components package)
TRAINING_CODE = (
    "train.py",
    "io/training_data.py",
    "io/activations.py",
    "core/views.py",
    "core/model.py",
    "core/objectives.py",
    "core/batching.py",
    "core/distillation.py",
    "core/encoders.py",
)


def code_hash() -> str:
    """sha256 over the source of `TRAINING_CODE`."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in TRAINING_CODE:
        digest.update((package / name).read_bytes())
    return digest.hexdigest()


def _per_task(record: dict) -> str:
    return ", ".join(
        f"{record[key]:.3f} {task.split('_')[0]}"
        for task in TASKS
        if (key := f"val/{task}/recall@10") in record
    )


def _already_recorded(out: Path, config: TrainConfig, lineage: dict) -> TrainResult | None:
    """The result of a finished run with these params and inputs whose outputs are intact,
    so that running the step again registers no new model version; else None."""
    manifest = unchanged_manifest(out, config, lineage, OUTPUTS)
    record = read_run(out)
    if manifest is None or record is None:  # no record: the registered version is unknown
        return None
    version = record["registered_model"]["version"]
    summary = f"{record['summary']} (already trained and registered as version {version})"
    return TrainResult(out_dir=out, best=manifest["best"], summary=summary)


def _record(config, paths, data, features_manifest, lineage, history, run_, timer, summary):
    """Rank 0: history, metrics, MLflow summary and registration, the manifest."""
    out = paths.step_dir(STEP.name)
    best = max(history, key=lambda h: h["val/score"])
    atomic.write_text(paths.path(HISTORY), json.dumps(history, indent=2) + "\n")
    atomic.write_text(paths.path(TRAIN_METRICS), json.dumps(best, indent=2) + "\n")
    run_.log_summary(best, paths.path(HISTORY), history)
    spec = {
        "model": model_spec(config, data),
        "finetune_blocks": config.finetune_blocks,
        **encoder_spec(features_manifest),
    }
    alias = paths.registry.challenger_alias
    registered = serving.register(
        paths.path(MODEL_WEIGHTS), spec, paths.registry.model_name, alias, paths.path(MODEL_SPEC)
    )
    log.info(
        "train: registered %s version %s as @%s",
        registered["name"],
        registered["version"],
        alias,
    )
    write_manifest(
        out,
        step=STEP.name,
        params=config,
        timer=timer,
        inputs=lineage,
        outputs=describe_files(out, OUTPUTS),
        counts={
            "listings": len(data.listing_ids),
            "epochs": len(history),
            "processes": distributed.world_size(),
        },
        extra={"best": best, "model": spec},
        run={"summary": summary, "mlflow": run_.reference, "registered_model": registered},
    )


def model_spec(config: TrainConfig, data: TrainingData) -> dict:
    """Everything needed to rebuild the model from its state dict (with the encoder's
    tail, when the backbone is fine-tuned: `finetune_blocks` in the serving spec)."""
    pooled = encoders.POOLED_DIM if config.finetune_blocks else data.image_features.shape[1]
    return {
        "image_dim": int(pooled),
        "text_dim": int(data.text_features.shape[1]),
        "dim": config.dim,
        "hidden": config.hidden,
        "dropout": config.dropout,
        "alpha": config.alpha,
        "image_share": config.image_share,
        "temperature": config.temperature,
        "learn_temperature": config.learn_temperature,
        "residual": config.adapter == "residual",
        "fusion": config.fusion,
    }


def encoder_spec(features_manifest: dict) -> dict:
    """How the features the model was trained on were made: the serving model redoes it."""
    params = features_manifest["params"]
    spec = {
        key: params[key] for key in ("image_encoder", "image_size", "text_encoder", "text_views")
    }
    return spec | {"colour_histogram": params.get("colour_histogram", 0)}


def build_model(
    config: TrainConfig, data: TrainingData, tail: torch.nn.Module | None = None
) -> ListingModel:
    """The model to train; residual adapters start from the frozen features' geometry."""
    model = ListingModel(**model_spec(config, data), image_tail=tail)
    if config.adapter == "residual":
        view_rows = sorted({row for texts in data.texts for row in texts.rows})
        # listing text views and training queries only: never a val or test query
        corpus = np.concatenate([data.text_features[view_rows], data.queries["train"].features])
        both = [  # listings with a photo and a text (train.corrupt may take one away)
            i
            for i, (im, tx) in enumerate(zip(data.images, data.texts, strict=True))
            if im.rows and tx.rows
        ]
        titles = data.text_features[[data.texts[i].rows[0] for i in both]]  # primary views
        photos = None
        if tail is None:  # a fine-tuned backbone's photos are not features yet
            photos = data.image_features[[data.images[i].rows[0] for i in both]]
        init_residual(
            model,
            torch.from_numpy(corpus),
            None if photos is None else torch.from_numpy(photos),
            torch.from_numpy(titles),
        )
    return model


class Trainer:
    """The epoch loop: batches, optimisation, validation, checkpoints, early stopping."""

    def __init__(
        self,
        config: TrainConfig,
        data: TrainingData,
        model: ListingModel,
        device: torch.device,
        seed: int,
        train_views: dict[str, list[ListingViews]] | None = None,
    ) -> None:
        """`train_views`: `images` and/or `texts` that training batches use instead of the
        data's own (`corrupted`); validation always uses the data's."""
        self.config = config
        self.data = data
        self.train_images = (train_views or {}).get("images", data.images)
        self.train_texts = (train_views or {}).get("texts", data.texts)
        self.model = model
        self.net = distributed.wrap(model, device)  # DDP under torchrun
        self.device = device
        ot = config.ot_regularizer
        self.objective = build_objective(
            config.objective,
            config.aux_samples,
            config.sinkhorn_epsilon,
            config.sinkhorn_iterations,
            TransportRegularizer(
                ot.weight, ot.epsilon, ot.iterations, ot.loop_weight, ot.downweight
            )
            if ot.weight > 0
            else None,
        )
        distill = config.distill
        self.teacher = EmaTeacher(model, distill.momentum) if distill.weight > 0 else None
        self.distillation = DistillationLoss(distill.weight, distill.temperature)
        self.rng = np.random.default_rng(seed)
        tail = set(model.image_tail.parameters()) if model.image_tail is not None else set()
        groups = [
            {"params": [p for p in model.parameters() if p not in tail], "lr": config.lr},
            {"params": list(tail), "lr": config.finetune_lr},
        ]
        self.optimizer = torch.optim.AdamW(
            [group for group in groups if group["params"]], weight_decay=config.weight_decay
        )
        self.global_batch = config.batch_size * distributed.world_size()
        self.steps_per_epoch = math.ceil(len(data.listing_ids) / self.global_batch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.queries_by_listing = data.train_queries_by_listing
        self.history: list[dict] = []
        self.lineage: dict = {}
        self.best_state: dict[str, torch.Tensor] = {}  # weights of the best epoch so far
        self.seconds_per_step = 0.0

    def _lr_factor(self, step: int) -> float:
        warmup = self.config.warmup_epochs * self.steps_per_epoch
        total = self.config.epochs * self.steps_per_epoch
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1.0, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    @property
    def finished(self) -> bool:
        """Every epoch done, or stopped early: nothing is left to train."""
        return len(self.history) >= self.config.epochs or (
            bool(self.history) and _epochs_since_best(self.history) >= self.config.patience
        )

    def resume(self, directory: Path, lineage: dict) -> int:
        """Load the last checkpoint in `directory` if it was made with the same params,
        features, seed and training code (`lineage`); return the epoch to start from.

        Raises:
            AlteredFile: the checkpoint is not the file that was written.
        """
        self.lineage = lineage
        state = checkpoints.load(directory, self.device)
        if state is None:
            return 0
        if state["config"] != self.config.model_dump():
            log.info("train: checkpoint in %s has other params; starting afresh", directory)
            return 0
        if state.get("lineage") != lineage:
            log.info(
                "train: checkpoint in %s is from other features, seed or training code; "
                "starting afresh",
                directory,
            )
            return 0
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as err:  # the model code changed since the checkpoint
            log.info(
                "train: checkpoint in %s does not fit the current model (%s); starting afresh",
                directory,
                str(err).splitlines()[0],
            )
            return 0
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        if self.teacher is not None:
            self.teacher.model.load_state_dict(state["teacher"])
        self.history = state["history"]
        self.best_state = state["best_model"]
        log.info("train: resumed from %s after epoch %d", directory, state["epoch"])
        return state["epoch"] + 1

    def fit(self, start_epoch: int, out: Path, run_) -> list[dict]:
        best = max((h["val/score"] for h in self.history), default=-1.0)
        stale = _epochs_since_best(self.history)
        for epoch in range(start_epoch, self.config.epochs):
            if stale >= self.config.patience:
                log.info(
                    "train: early stop at epoch %d (%d epochs without improvement)", epoch, stale
                )
                break
            losses = self._train_epoch(epoch)
            record = {
                "epoch": epoch,
                **losses,
                **self.validate(),
                "lr": self.scheduler.get_last_lr()[0],
                "temperature": float(1 / self.model.scale.item()),
            }
            self.history.append(record)
            run_.log_epoch(record)
            if record["val/score"] > best:
                best, stale = record["val/score"], 0
                self.best_state = {
                    k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
                }
                if distributed.is_main():
                    _save_weights(self.best_state, out / MODEL_WEIGHTS.name)
            else:
                stale += 1
            if distributed.is_main():
                self._checkpoint(out / CHECKPOINTS.name, epoch)
            log.info(
                "train: epoch %d loss %.4f val recall@10 %.3f",
                epoch,
                losses["loss"],
                record["val/score"],
            )
        return self.history

    def _train_epoch(self, epoch: int) -> dict:
        self.model.train()
        order = self.rng.permutation(len(self.data.listing_ids))
        totals: dict[str, float] = {}
        start = time.perf_counter()
        batches = range(0, len(order), self.global_batch)
        for first in progress(
            batches,
            desc=f"train: epoch {epoch}",
            unit="step",
            leave=False,
            mininterval=2,
            disable=not distributed.is_main(),
        ):
            members = order[first : first + self.global_batch]
            if len(members) < 2 * distributed.world_size():
                continue  # a contrastive step needs negatives on every rank
            members = distributed.local_slice(members)
            terms = self._step(self._batch(members))
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value
        self.seconds_per_step = (time.perf_counter() - start) / max(1, len(batches))
        totals = distributed.mean_across_ranks(totals)
        return {f"train/{k}": v / max(1, len(batches)) for k, v in totals.items()} | {
            "loss": sum(totals.values()) / max(1, len(batches))
        }

    def _batch(self, members: np.ndarray) -> Batch:
        aux, cap = self.objective.aux_views, self.config.max_views
        images = pad_views(
            self.data.image_features, [self.train_images[i] for i in members], aux, self.rng, cap
        )
        texts = pad_views(
            self.data.text_features, [self.train_texts[i] for i in members], aux, self.rng, cap
        )
        every_view = {}
        if self.teacher is not None:  # the teacher sees all of each listing's views
            every_view = {
                "all_images": self._all_views(self.data.image_features, self.train_images, members),
                "all_texts": self._all_views(self.data.text_features, self.train_texts, members),
            }
        picked = [
            (slot, self.rng.choice(self.queries_by_listing[i]))
            for slot, i in enumerate(members)
            if self.queries_by_listing.get(i)
        ]
        if not self.queries_by_listing:  # no training queries at all: no query term
            return Batch(images, texts, **every_view)
        features = self.data.queries["train"].features
        return Batch(  # possibly zero rows: every rank must take part in the query term
            images,
            texts,
            torch.from_numpy(features[np.asarray([q for _, q in picked], dtype=np.int64)]),
            torch.tensor([slot for slot, _ in picked], dtype=torch.long),
            **every_view,
        )

    def _all_views(self, table: np.ndarray, views: list[ListingViews], members) -> Views:
        """Every view (up to `max_views`) of the members: takes nothing from the rng."""
        return pad_views(table, [views[i] for i in members], None, self.rng, self.config.max_views)

    def _step(self, batch: Batch) -> dict[str, float]:
        batch = batch.to(self.device)
        with autocast(self.device) if self.config.amp else contextlib.nullcontext():
            out = self.net(batch.images, batch.texts, batch.query_features)
            terms = self.objective(out, batch)
            if self.teacher is not None:
                fused, queries = self.teacher.targets(
                    batch.all_images, batch.all_texts, batch.query_features
                )
                terms |= self.distillation(out, fused, queries)
            loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.teacher is not None:
            self.teacher.update(self.model)
        return {name: float(value.detach()) for name, value in terms.items()}

    @torch.no_grad()
    def validate(self, split: str = "val") -> dict:
        return evaluate_split(self.model, self.data, split, self.config.ks, self.device)

    def _checkpoint(self, directory: Path, epoch: int) -> None:
        state = {
            "epoch": epoch,
            "config": self.config.model_dump(),
            "lineage": self.lineage,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "best_model": self.best_state,
            "teacher": None if self.teacher is None else self.teacher.model.state_dict(),
        }
        checkpoints.save(directory, state, epoch)


def _save_weights(state: dict, path: Path) -> None:
    with atomic.writing(path) as tmp:
        torch.save(state, tmp)


def _epochs_since_best(history: list[dict]) -> int:
    """Epochs after the first best val score (0 when the last epoch was the best)."""
    if not history:
        return 0
    scores = [record["val/score"] for record in history]
    return len(history) - 1 - scores.index(max(scores))


def embed_all_listings(model: ListingModel, data: TrainingData, device: torch.device):
    """Fused embeddings of every listing from all its (non-held-out) views."""
    return fuse_listings(
        model, data.image_features, data.images, data.text_features, data.texts, EMBED_BATCH, device
    )


@torch.no_grad()
def evaluate_split(
    model: ListingModel, data: TrainingData, split: str, ks: list[int], device: torch.device
) -> dict:
    """Query-to-listing and held-out-view-to-listing retrieval on one split (exact search
    over every listing: the same path as the evaluate step's)."""
    listings = embed_all_listings(model, data, device)
    cutoffs = sorted({*ks, 10})
    metrics, _, _ = evaluate_tasks(
        model, data.tasks(split), listings, cutoffs, len(listings), device
    )
    out = {f"{split}/{k}": v for k, v in metrics.items() if not k.endswith("/queries")}
    # model selection: mean recall@10 over the tasks that have queries (absent ones: none)
    found = [out[key] for task in TASKS if (key := f"{split}/{task}/recall@10") in out]
    out[f"{split}/score"] = float(np.mean(found)) if found else 0.0
    return out
