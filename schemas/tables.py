"""Schemas of every table the pipeline reads or writes, and the records stages pass.

Stages hand each other paths and these small records, never DataFrames or models.
"""

from __future__ import annotations

from pathlib import Path

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

# Feature tables (features/run_date=.../). Index 0 is padding / unknown in both vocabularies.
SPLITS = ("fit", "valid", "test")
EVENTS = pl.Schema(
    {"user_idx": pl.Int32, "item_idx": pl.Int32, "timestamp": pl.Int64, "split": pl.Enum(list(SPLITS))}
)

# THE output table (recommendations/run_date=.../part-*.parquet), as DESIGN.md fixes it.
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
        "score": pl.Float32,  # time-decayed event count
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


class Snapshot(BaseModel):
    """A run's validated input: where it lies and what it holds."""

    path: Path
    source: str
    n_interactions: int
    n_users: int
    n_items: int
    has_items: bool
    data_hash: str
    origin: dict[str, str]  # table -> the file it was read from, for error messages

    @property
    def interactions(self) -> Path:
        return self.path / "interactions.parquet"

    @property
    def items(self) -> Path:
        return self.path / "items.parquet"


class FeatureSet(BaseModel):
    """Vocabularies, the time split and item content, as written by tasks/features.py."""

    path: Path
    n_users: int
    n_items: int
    n_categories: int
    n_title_tokens: int
    split_sizes: dict[str, int]


class TrainedModel(BaseModel):
    """A SavedModel directory and what training measured."""

    path: Path
    epochs: int
    seconds: float
    metrics: dict[str, float]
    history: dict[str, list[float]] = {}  # per-epoch curves, plotted in MLflow


class ModelSet(BaseModel):
    """Both models of a run, in models/<key>/ (retrieval/, ranking/, vocab/)."""

    path: Path
    key: str
    retrieval: TrainedModel
    ranking: TrainedModel


class ChampionDecision(BaseModel):
    """Which models score tonight and why."""

    mlflow_run_id: str
    model_version: str
    models_path: Path
    promoted: bool
    reason: str
    metrics: dict[str, float]


class PublishedTable(BaseModel):
    path: Path
    rows: int
    users: int
