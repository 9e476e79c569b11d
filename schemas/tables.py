"""Schemas of every table the pipeline reads or writes, the workspace layout, and the
records stages pass.

Stages hand each other paths and these small records, never DataFrames or models.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import ClassVar

import polars as pl
from pydantic import BaseModel

# Input, after ingestion has normalised it (snapshots/run_date=.../*.parquet).
INTERACTIONS = pl.Schema(
    {
        "user_id": pl.String,
        "item_id": pl.String,
        "timestamp": pl.Int64,  # unix seconds, UTC
        "rating": pl.Float64,
        "event_type": pl.String,
        "weight": pl.Float64,
    }
)
INTERACTIONS_REQUIRED = ("user_id", "item_id", "timestamp")
ITEMS = pl.Schema({"item_id": pl.String, "title": pl.String, "categories": pl.List(pl.String)})
# Optional columns of the items table: when an item may be shown (docs/lists.md, "Business rules").
AVAILABILITY = pl.Schema({"available": pl.Boolean, "available_from": pl.Int64, "available_until": pl.Int64})
# Pairs never to recommend (exclusions.*, optional): a null user_id excludes the item for everyone;
# a pair holds until `until` (unix seconds, UTC), or for good when it is null.
EXCLUSIONS = pl.Schema({"user_id": pl.String, "item_id": pl.String, "until": pl.Int64})

# Feature tables (features/run_date=.../). Index 0 is padding / unknown in both vocabularies.
SPLITS = ("fit", "valid", "test")
EVENTS = pl.Schema(
    {"user_idx": pl.Int32, "item_idx": pl.Int32, "timestamp": pl.Int64, "split": pl.Enum(list(SPLITS))}
)

# THE output table (recommendations/run_date=.../part-*.parquet; docs/design.md, "Contracts").
RECOMMENDATIONS = pl.Schema(
    {
        "run_date": pl.Date,
        "user_id": pl.String,
        "rank": pl.Int32,
        "item_id": pl.String,
        "score": pl.Float32,
        "retrieval_score": pl.Float32,
        "model_version": pl.String,
        "mlflow_run_id": pl.String,
        "because_item_id": pl.String,  # the history item most like this one (see `reason`)
        "reason": pl.String,
    }
)

# What to serve a user the run does not know (fallback/run_date=.../part-00000.parquet):
# recent popularity overall (category null) and within each category.
FALLBACK = pl.Schema(
    {
        "run_date": pl.Date,
        "category": pl.String,
        "rank": pl.Int32,
        "item_id": pl.String,
        "score": pl.Float32,  # log2 of the time-decayed event count (tasks/featurize.py)
    }
)

# "More like this" (similar_items/run_date=.../part-00000.parquet): each item's nearest
# items by the candidate tower's embeddings.
SIMILAR_ITEMS = pl.Schema(
    {
        "run_date": pl.Date,
        "item_id": pl.String,
        "rank": pl.Int32,
        "similar_item_id": pl.String,
        "score": pl.Float32,  # cosine similarity
        "model_version": pl.String,
        "mlflow_run_id": pl.String,
    }
)

# Dated tables of the workspace: one directory per run date (`partition`).
DATED_TABLES = ("snapshots", "quarantine", "features", "recommendations", "fallback", "similar_items")
STAGE_RECORD = "_stage.json"  # beside a stage's output: its cache key and record


def partition(workspace: Path, table: str, run_date: dt.date) -> Path:
    """The directory of `table`'s partition for `run_date`."""
    return workspace / table / f"run_date={run_date.isoformat()}"


class StageRecord(BaseModel):
    """What a stage returns, and what it stamps beside its output (STAGE_RECORD).

    `key` is the hash of everything the output was computed from (empty for stages that
    always run); `reused` says whether this run found that output already in place;
    `seconds` is how long the stage took in this run. The last two describe a run, so
    they are never stamped.
    """

    key: str = ""
    reused: bool = False
    seconds: float = 0.0

    def run_metrics(self) -> dict[str, float]:
        """What this record adds to the metrics of tonight's MLflow run."""
        return {}

    def run_tags(self) -> dict[str, str]:
        """What this record adds to the tags of tonight's MLflow run."""
        return {}

    def run_tables(self) -> dict[str, list[dict]]:
        """Tables (file name -> rows) this record adds to tonight's MLflow run as CSV artifacts."""
        return {}


class Snapshot(StageRecord):
    """A run's validated input: where it lies and what it holds."""

    path: Path
    source: str
    n_interactions: int
    n_users: int
    n_items: int
    has_items: bool
    data_hash: str
    origin: dict[str, str]  # table -> the file it was read from, for error messages
    pseudonym_key: str | None = None  # which key made the user ids pseudonyms (tasks/privacy.py), if any

    @property
    def interactions(self) -> Path:
        return self.path / "interactions.parquet"

    @property
    def items(self) -> Path:
        return self.path / "items.parquet"

    @property
    def exclusions(self) -> Path:
        """Pairs never to recommend (EXCLUSIONS); present only when the source has them."""
        return self.path / "exclusions.parquet"

    @property
    def rejected(self) -> Path:
        """Rows ingestion set apart with a reason each, staged for validation to quarantine."""
        return self.path / "rejected_rows.parquet"

    @property
    def validation(self) -> Path:
        """Great Expectations' results (JSON) and Data Docs (HTML)."""
        return self.path / "validation"

    def run_metrics(self) -> dict[str, float]:
        return {"data_interactions": self.n_interactions, "data_users": self.n_users, "data_items": self.n_items}


class FeatureSet(StageRecord):
    """Vocabularies, the time split and item content, as written by the features stage."""

    path: Path
    n_users: int
    n_items: int
    n_categories: int
    n_title_tokens: int
    split_sizes: dict[str, int]

    def run_metrics(self) -> dict[str, float]:
        return {f"data_{split}_events": size for split, size in self.split_sizes.items()}


# The MLflow model each night's run logs (tasks/serving.py): run artifact `recommender/`, with
# the models directory and the night's feature set under its artifacts/. Registered versions
# point at it.
RECOMMENDER = "recommender"
RECOMMENDER_MODELS = f"{RECOMMENDER}/artifacts/models"
RECOMMENDER_FEATURES = f"{RECOMMENDER}/artifacts/features"


class ModelDir(BaseModel):
    """The layout of a models/<key>/ directory, and of RECOMMENDER_MODELS in the artifacts of
    the MLflow run that trained it: both SavedModels and the vocabularies they were trained with.

    Every path into such a directory comes from here.
    """

    path: Path

    RETRIEVAL: ClassVar[str] = "retrieval"  # SavedModel: `query` and `candidates` signatures
    # the same two-tower recipe trained on the fit split alone: what ranker training and evaluation score with
    FIT_RETRIEVAL: ClassVar[str] = "retrieval-fit"
    RANKING: ClassVar[str] = "ranking"  # SavedModel: `score` signature
    USER_VOCABULARY: ClassVar[str] = "vocab/users.parquet"
    ITEM_VOCABULARY: ClassVar[str] = "vocab/items.parquet"

    @classmethod
    def of(cls, workspace: Path, key: str) -> "ModelDir":
        """The models directory of model key `key` in `workspace`."""
        return cls(path=workspace / "models" / key)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def retrieval_path(self) -> Path:
        return self.path / self.RETRIEVAL

    @property
    def fit_retrieval_path(self) -> Path:
        return self.path / self.FIT_RETRIEVAL

    @property
    def ranking_path(self) -> Path:
        return self.path / self.RANKING

    @property
    def vocabulary(self) -> Path:
        return self.path / "vocab"

    @property
    def users(self) -> Path:
        return self.path / self.USER_VOCABULARY

    @property
    def items(self) -> Path:
        return self.path / self.ITEM_VOCABULARY

    @property
    def item_popularity(self) -> Path:
        """Events per item (model index) in the training data."""
        return self.vocabulary / "item_popularity.npy"

    @property
    def privacy(self) -> Path:
        """The privacy settings of the training data (tasks/privacy.py)."""
        return self.vocabulary / "privacy.json"

    @property
    def settings(self) -> Path:
        """How the models are used: the model format and the selection behind their
        candidate sources (tasks/inference.py:save_settings)."""
        return self.path / "settings.json"

    @property
    def fit_similarity(self) -> Path:
        """The co-visitation similarity of the `fit` events that the selection chose, handed
        from the select stage to ranker training in a staging directory (never published)."""
        return self.path / "_fit_similarity.npz"

    @property
    def evaluation(self) -> Path:
        """Cached held-out metrics of these models, one file per feature set and list config."""
        return self.path / "evaluation"

    def is_complete(self) -> bool:
        return (self.ranking_path / "saved_model.pb").exists()


class CandidateSources(BaseModel):
    """How a model draws its candidates: what its ranker was trained on, and what scoring
    with it uses (tasks/candidates.py)."""

    two_tower: int
    covisitation: int
    half_life: float
    shrink: float  # of the co-visitation item similarity (tasks/inference.py:item_similarity)
    asymmetry: float


class Trial(BaseModel):
    """One co-visitation similarity the selection scored on the validation split."""

    shrink: float
    asymmetry: float
    ndcg: float | None = None  # of co-visitation's own top 10; None when the time budget ran out first
    recall: float | None = None  # of its candidates (`covisitation` of them)
    seconds: float = 0.0


class Selection(StageRecord):
    """The candidate sources chosen for tonight's models, and every trial behind the choice."""

    sources: CandidateSources
    trials: list[Trial]
    users: int  # validation users the trials were scored on

    def run_metrics(self) -> dict[str, float]:
        chosen = next(t for t in self.trials if (t.shrink, t.asymmetry) == (self.sources.shrink, self.sources.asymmetry))
        return {"selection_shrink": self.sources.shrink, "selection_asymmetry": self.sources.asymmetry,
                "selection_trials": sum(t.ndcg is not None for t in self.trials),
                "selection_covisitation_ndcg_at_10": chosen.ndcg or 0.0}

    def run_tables(self) -> dict[str, list[dict]]:
        return {"selection.csv": [trial.model_dump() for trial in self.trials]}


class TrainedModel(StageRecord):
    """A SavedModel directory and what training measured."""

    path: Path
    epochs: int
    metrics: dict[str, float]
    history: dict[str, list[float]] = {}  # per-epoch curves, plotted in MLflow
    warm_start_from: str | None = None  # the models directory whose weights training started from


class ModelSet(ModelDir, StageRecord):
    """Both models of a run, in models/<key>/, and how their training went."""

    retrieval: TrainedModel
    ranking: TrainedModel

    def run_metrics(self) -> dict[str, float]:
        return ({f"retrieval_{name}": value for name, value in self.retrieval.metrics.items()}
                | {f"ranking_{name}": value for name, value in self.ranking.metrics.items()}
                | {"retrieval_epochs": self.retrieval.epochs})

    def run_tags(self) -> dict[str, str]:
        return {"model_key": self.key, "warm_start_from": self.retrieval.warm_start_from or "none"}


class ChampionDecision(StageRecord):
    """Which models score tonight and why."""

    mlflow_run_id: str
    model_version: str
    models_path: Path
    promoted: bool
    reason: str
    metrics: dict[str, float]

    @property
    def models(self) -> ModelDir:
        return ModelDir(path=self.models_path)


class ScoringJob(StageRecord):
    """Tonight's partition being scored: the staging directory the shards write their parts
    to, and what they score with."""

    path: Path
    features: FeatureSet
    decision: ChampionDecision


class ScoredShard(StageRecord):
    shard: int
    rows: int
    users_filled: int = 0  # lists the business rules left short, filled from the fallback order


class PublishedTable(StageRecord):
    path: Path
    rows: int
    users: int
    users_filled: int = 0  # users whose list was filled from the fallback order (tasks/lists.py)

    def run_metrics(self) -> dict[str, float]:
        return {"output_rows": self.rows, "output_users": self.users, "output_users_filled": self.users_filled}


class ListHealth(StageRecord):
    """Tonight's lists against the last published ones (tasks/health.py): each figure,
    the partition compared with (None on the first night) and the thresholds broken."""

    figures: dict[str, float]
    compared_with: str | None = None
    breaches: list[str] = []

    def metrics(self) -> dict[str, float]:
        """The figures as MLflow metrics, logged by the stage itself (on a breach too)."""
        return {f"lists_{name}": value for name, value in self.figures.items()}


class Catalogue(StageRecord):
    """Rows of the tables published beside the recommendations."""

    fallback_rows: int
    similar_items_rows: int

    def run_metrics(self) -> dict[str, float]:
        return {"fallback_rows": self.fallback_rows, "similar_items_rows": self.similar_items_rows}


class Cleanup(StageRecord):
    """What a successful run removed from earlier runs' files (tasks/privacy.py)."""

    rewritten: int  # partitions and files rebuilt without users on the deletion list
    removed: int  # derived directories (features, models) that held them
    pruned: list[str]  # partitions past the retention window
