"""The pipeline's one configuration model.

Every knob of a nightly run lives here, with a default that works offline on a fresh
machine. The Prefect flow takes this model as its only parameter, so the Prefect UI renders
it as a form; `recflow run --config FILE` reads the same model from YAML or JSON.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.tables import partition


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticConfig(_Section):
    """Sizes of the built-in synthetic source (planted clusters and sequences), used when
    `source` is 'synthetic'; its seed is the run's `seed`."""

    n_users: int = Field(
        600, ge=2, description="users of the synthetic world; a date sees those with events in its window"
    )
    n_items: int = Field(1500, ge=10, description="items of the synthetic catalogue, each with a title and categories")
    n_clusters: int = Field(
        8, ge=1, description="latent tastes (at most n_items): each item belongs to one, each user has a main "
        "and a second one",
    )
    events_per_user: int = Field(60, ge=5, description="mean events per user")
    n_categories: int = Field(16, ge=1, description="item categories; each cluster's items mostly take two of them")
    days: int = Field(365, ge=1, description="history length in days, ending the day before the run date")
    discontinued_share: float = Field(
        0.03, ge=0, le=1,
        description="share of items discontinued during the history (available_until a seeded day of the window, "
        "no events after it): the business rules keep them out of every list",
    )
    upcoming_share: float = Field(
        0.02, ge=0, le=1,
        description="share of items launching after the run date (available_from a seeded day of the next 30, "
        "no events yet): in the catalogue, in no list until they launch",
    )
    repeat_share: float = Field(
        0.0, ge=0, lt=1,
        description="share of a walk's steps that go back to an item the user had before (0: every item once); "
        "a repeat-heavy world for lists.repeats",
    )
    exclusions: int = Field(
        30, ge=0,
        description="(user, item) pairs of the synthetic exclusions table (never to recommend: hidden, returned), "
        "items drawn by popularity, half of them until two days after the run date; when above 0, one seeded "
        "item is also excluded for everyone",
    )


class ValidationConfig(_Section):
    """Thresholds of the Great Expectations gate (schemas/suites.py) and of the row rules
    (schemas/rules.py)."""

    min_rows: int = Field(100, ge=1, description="fewest interactions a snapshot may have")
    min_users: int = Field(10, ge=1, description="fewest distinct users the interactions may have")
    min_items: int = Field(10, ge=1, description="fewest distinct items the interactions may have")
    rating_min: float = Field(0.0, description="lowest valid rating; a row rated below it breaks a row rule")
    rating_max: float = Field(5.0, description="highest valid rating; a row rated above it breaks a row rule")
    max_duplicate_rate: float = Field(
        0.05, ge=0, le=1, description="largest allowed share of exact duplicate (user, item, timestamp) events"
    )
    max_volume_drop: float = Field(
        0.5, ge=0, le=1, description="largest allowed drop in interactions against the latest earlier run date"
    )
    max_new_user_share: float = Field(
        0.5, ge=0, le=1, description="largest share of tonight's events from users the latest earlier snapshot "
        "did not have",
    )
    max_new_item_share: float = Field(
        0.5, ge=0, le=1, description="largest share of tonight's events on items the latest earlier snapshot did "
        "not have",
    )
    max_events_per_user_kl: float | None = Field(
        0.2, ge=0, description="largest KL divergence of the events-per-user distribution (power-of-two buckets) "
        "from the latest earlier snapshot's; None = not checked",
    )
    max_category_kl: float | None = Field(
        0.2, ge=0, description="largest KL divergence of the events' category mix from the latest earlier "
        "snapshot's (with an items table both nights); None = not checked",
    )
    max_bad_row_fraction: float = Field(
        0.0, ge=0, lt=1,
        description="share of interactions that may be quarantined row by row (bad id, timestamp or rating) "
        "while the run goes on; 0 = any bad row fails the run",
    )


class FeatureConfig(_Section):
    """How events become model inputs (tasks/featurize.py): the time split of each user's
    events into `fit`, `valid` and `test`, the user sample later stages compute on, the
    history the query tower reads and the title words the item tower reads."""

    history_length: int = Field(20, ge=1, description="recent items kept per user sequence")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="latest share of each user's events held out for evaluation")
    valid_fraction: float = Field(
        0.1, gt=0, lt=1, description="share before the holdout used for early stopping and ranker training"
    )
    min_user_events: int = Field(5, ge=3, description="users with fewer events are never held out from")
    sample_users: int = Field(
        20_000, ge=1,
        description="users (a fixed seeded sample) whose lists validation, ranker training and held-out metrics "
        "compute; all users when fewer",
    )
    max_title_tokens: int = Field(8, ge=0, description="title words kept per item, the most frequent first")
    title_vocab_size: int = Field(
        5000, ge=0, description="title words indexed: the most frequent of those in at least two items' titles"
    )


class RetrievalConfig(_Section):
    """The two-tower retrieval model (tasks/towers.py) and its training (tasks/retrieval.py).

    Defaults: the winner of bench/tune.py's seeded search (bench/results/tune.json), with
    features.history_length 20; a full ml-latest-small run with them stays under 3 minutes."""

    embedding_dim: int = Field(128, ge=4, multiple_of=2, description="even: self-attention splits it into two heads")
    history_encoder: Literal["attention", "transformer", "gru"] = Field(
        "transformer", description="how the query tower reads the history: attention pooling, self-attention, GRU"
    )
    user_embedding: bool = Field(
        False, description="a learned embedding per user id in the query tower, beside the history (which already "
        "carries the user); with short histories it overfits",
    )
    batch_size: int = Field(
        512, ge=8, description="next-item targets per batch (whole history windows, so about); each target's "
        "negatives are the batch's other targets",
    )
    learning_rate: float = Field(0.003, gt=0, description="Adam's learning rate")
    max_epochs: int = Field(15, ge=1, description="most epochs trained; early stopping usually ends sooner")
    max_examples_per_epoch: int = Field(
        250_000, ge=1,
        description="an epoch is at most this many next-item targets (the next one goes on through the data): with "
        "max_epochs it bounds training time on large data, and validation runs often enough to stop early",
    )
    patience: int = Field(2, ge=1, description="epochs without better validation recall before stopping")
    patience_examples: int = Field(
        100_000, ge=1,
        description="and at least this many next-item targets trained without better validation recall: on small "
        "data, whose epochs are short, more epochs than `patience`",
    )
    min_improvement: float = Field(
        0.01, ge=0, description="an epoch counts as better only when it raises the best validation recall so far by "
        "this share of it",
    )
    dropout: float = Field(0.5, ge=0, lt=1, description="share of the history's item representations dropped in training")
    temperature: float = Field(
        0.1, gt=0, description="softmax temperature of the retrieval loss over the cosine of query and item "
        "(between -1 and 1): lower sharpens the positive against the negatives",
    )
    l2: float = Field(3e-7, ge=0, description="L2 penalty on the item and user id embeddings; 0 = none")
    warm_start: bool = Field(False, description="start training from the champion's weights, when there is one")
    strategy: Literal["default", "mirrored", "multi_worker"] = Field(
        "default",
        description="tf.distribute strategy: one device; MirroredStrategy over this machine's GPUs (or `devices` "
        "logical CPUs); MultiWorkerMirroredStrategy over `workers` processes that Ray Train starts",
    )
    devices: int = Field(1, ge=1, description="with the mirrored strategy and no GPU: logical CPU devices to mirror over")
    workers: int = Field(2, ge=1, description="with the multi_worker strategy: training processes, one replica each")
    cluster: str | None = Field(
        None, description="with the multi_worker strategy: the Ray cluster to train on (`auto`, or `ray://host:10001`; "
        "its nodes need this repository installed and the workspace on a shared filesystem); none starts one on this "
        "machine for the stage",
    )
    index: Literal["auto", "exact", "ann"] = Field(
        "auto",
        description="how the two-tower's nearest items are found, in validation, evaluation, scoring and the served "
        "model alike: `exact` scores every item (the reference); `ann` searches a faiss HNSW graph of the item "
        "embeddings, saved with the model (faster on large catalogues; it missed 0.3-1.8% of the exact top 100 in "
        "the benches, 9.1% on the 30M synthetic night's served model: docs/performance.md); `auto` is `ann` from 50,000 items on. A model keeps the search it was trained with",
    )


class CandidateConfig(_Section):
    """Where each user's candidates come from (tasks/candidates.py); the ranker orders them.

    The co-visitation source's item similarity is chosen every night by the selection stage
    (tasks/select.py): each pair of `similarity_shrink` x `similarity_asymmetry` is scored on
    the validation split, and the best one is used.
    """

    two_tower: int = Field(100, ge=1, description="the two-tower model's nearest items per user")
    covisitation: int = Field(
        200, ge=0, description="then the items co-occurring most with the user's recent history, beyond those"
    )
    half_life: float = Field(
        5.0, gt=0, description="a history item's weight in co-visitation halves every this many later events"
    )
    similarity_shrink: list[float] = Field(
        [10.0, 50.0, 200.0], min_length=1,
        description="shrinkage of the item similarity tried by the selection, each at least 0: larger values "
        "trust items that co-occur rarely less",
    )
    similarity_asymmetry: list[float] = Field(
        [0.5, 0.7, 0.9], min_length=1,
        description="asymmetry of the item similarity tried by the selection, each between 0 and 1: 0.5 is "
        "cosine; towards 1 a history item's popularity is discounted more and a candidate's less",
    )
    selection_seconds: float = Field(
        120.0, gt=0, description="time budget of the selection: the first pair is always scored, another only "
        "when it would end within the budget, taking as long as the last one did",
    )

    @field_validator("similarity_shrink", "similarity_asymmetry")
    @classmethod
    def _valid_values(cls, values: list[float], info) -> list[float]:
        bad = [v for v in values if v < 0 or (info.field_name == "similarity_asymmetry" and v > 1)]
        if bad:
            bound = "between 0 and 1" if info.field_name == "similarity_asymmetry" else "at least 0"
            raise ValueError(f"{bad} must be {bound}")
        return values


class RankingConfig(_Section):
    """The ranker trains on the candidate lists of users with `valid` events. Two probe
    rankers, each trained on one seeded half of the lists until its loss on the other half
    stops falling, give every list scores from a ranker that never saw it; those choose the
    epochs and the popularity discount. A final ranker then trains on every list that long;
    the exported ranker scores the mean logit of it and the two probes, with that discount."""

    embedding_dim: int = Field(32, ge=4, description="size of the user and item id embeddings (with id_embeddings)")
    batch_size: int = Field(32, ge=1, description="users (candidate lists) per batch")
    learning_rate: float = Field(0.002, gt=0, description="Adam's learning rate")
    max_epochs: int = Field(
        30, ge=1, description="most epochs a probe ranker trains; the final ranker trains the probes' mean best "
        "epoch count"
    )
    patience: int = Field(3, ge=1, description="epochs without a lower held-out loss before stopping")
    popularity_discounts: list[float] = Field(
        [0.0, 0.1, 0.2, 0.3, 0.5], min_length=1,
        description="discounts of the ranker's score by log item popularity tried on the cross-fitted lists; another "
        "than the first is kept only when its NDCG@10 there is clearly better (a paired t of at least 2): lists "
        "reach further into the long tail where the data supports it. One value forces that discount",
    )
    cross_layers: int = Field(1, ge=0, description="DCN-v2 cross layers before the deep layers; 0 = deep layers only")
    l2: float = Field(1e-4, ge=0, description="L2 penalty on the id embeddings (with id_embeddings); 0 = none")
    id_embeddings: bool = Field(False, description="user and item id embeddings in the ranker (overfit on small data)")


class ListConfig(_Section):
    """How each user's final list is chosen from the ranked candidates."""

    diversity: float = Field(
        0.0, ge=0, lt=1,
        description="weight of category diversity in the choice (maximal marginal relevance); 0 = pure relevance",
    )
    new_item_slots: int = Field(
        1, ge=0, le=100,
        description="the last positions of a list, given to the user's best-retrieved new items (in the catalogue, "
        "no interactions yet) when the candidates hold any: new items get seen, and so get their first events",
    )
    new_items_from_rank: int = Field(
        11, ge=1,
        description="new-item slots go no higher than this rank: the top of a list stays the model's best "
        "(so a list of 10 gets none unless this is lowered)",
    )
    repeats: bool = Field(
        False,
        description="items a user has interacted with may be recommended again, once repeat_after_days have "
        "passed since their last interaction (groceries, music, local businesses); off: never again",
    )
    repeat_after_days: float = Field(
        30.0, ge=0, description="with repeats: days after a user's last interaction with an item before it may "
        "be recommended to them again",
    )
    max_per_category: int | None = Field(
        None, ge=1,
        description="at most this many items sharing a category in one list (a merchandising rule, applied after "
        "ranking, with diversity and new-item slots); items without categories are not capped; default: no cap",
    )


class MonitoringConfig(_Section):
    """Thresholds of the list-health gate (tasks/health.py): tonight's lists against the last
    published partition, checked before publishing. A figure past its threshold fails the
    run and leaves last night's lists current; None turns a check off. The defaults pass
    every normal night of the development datasets (docs/operations.md, "List health")."""

    max_short_lists: float | None = Field(
        0.05, ge=0, le=1, description="largest share of users with fewer than top_k items (or no list at all)"
    )
    max_new_lists: float | None = Field(
        0.8, ge=0, le=1, description="largest share of users (listed both nights) whose top-K shares no item with "
        "last night's",
    )
    min_overlap: float | None = Field(
        0.05, ge=0, le=1, description="smallest mean Jaccard@K between a user's list tonight and last night's"
    )
    min_coverage_change: float | None = Field(
        0.5, ge=0, description="smallest catalogue coverage@K of tonight's lists over last night's (0.5: half as "
        "many distinct items)",
    )
    max_popularity_change: float | None = Field(
        2.0, ge=0, description="largest popularity ratio (mean events of a listed item over an event's item's) of "
        "tonight's lists over last night's",
    )
    max_score_psi: float | None = Field(
        2.0, ge=0, description="largest population stability index of tonight's scores against last night's"
    )


class PrivacyConfig(_Section):
    """Opt-outs, pseudonymisation and retention (docs/operations.md, "Privacy operations")."""

    deleted_users: str | None = Field(
        None,
        description="a CSV or parquet file with a user_id column: users who opted out or asked to be deleted; "
        "their events are dropped at ingestion, so they are in no later artifact, model or output",
    )
    key_file: str | None = Field(
        None,
        description="a file holding a secret key, outside the workspace: when set, every user id is replaced by "
        "its keyed hash (HMAC-SHA256) at ingestion, in every artifact and output",
    )
    retention_days: int | None = Field(
        None, ge=1, description="keep dated partitions this many days before the run date; older ones are pruned "
        "after a successful run (default: keep everything)",
    )


class PipelineConfig(_Section):
    """Parameters of one nightly run."""

    source: str = Field(
        "synthetic",
        description="'synthetic', a directory (generic layout or MovieLens), or 'movielens:NAME' (a GroupLens "
        "archive, e.g. movielens:ml-latest-small)",
    )
    run_date: dt.date | None = Field(None, description="logical date of the run; default today (UTC)")
    workspace: str = Field("workspace", description="directory holding everything a run writes (no '..' in the path)")
    top_k: int = Field(
        20, ge=1, le=1000,
        description="items per user in the published lists and the fallback lists; the served model's default k",
    )
    shards: int = Field(
        1, ge=1, le=1024,
        description="scoring shards (ranges of users), run in parallel on the flow's task runner (threads; "
        "Dask workers when the run uses a Dask task runner); any count gives the same table",
    )
    similar_items: int = Field(10, ge=1, le=1000, description="neighbours per item in similar_items/")
    popularity_half_life_days: float = Field(
        30.0, gt=0, description="how fast an event's weight in the fallback lists' recent popularity halves"
    )
    seed: int = Field(
        42, description="seeds the synthetic source and training (initial weights, shuffles, the ranker's "
        "cross-fitting halves): the same data and seed give the same models",
    )
    mlflow_experiment: str = Field("recflow", description="MLflow experiment the runs are logged to; made if missing")
    synthetic: SyntheticConfig = Field(SyntheticConfig(), description="the built-in synthetic source")
    validation: ValidationConfig = Field(ValidationConfig(), description="thresholds of the validation gate")
    features: FeatureConfig = Field(FeatureConfig(), description="the time split, user sample and item content")
    retrieval: RetrievalConfig = Field(RetrievalConfig(), description="the two-tower retrieval model and its training")
    candidates: CandidateConfig = Field(CandidateConfig(), description="where each user's candidates come from")
    ranking: RankingConfig = Field(RankingConfig(), description="the ranker that orders the candidates")
    lists: ListConfig = Field(ListConfig(), description="how each user's final list is chosen")
    privacy: PrivacyConfig = Field(PrivacyConfig(), description="opt-outs, pseudonymisation and retention")
    monitoring: MonitoringConfig = Field(MonitoringConfig(), description="the list-health gate before publishing")

    @field_validator("workspace")
    @classmethod
    def _no_parent_references(cls, value: str) -> str:
        if ".." in Path(value).parts:
            raise ValueError(f"{value!r} must not contain '..' (give the workspace directory itself)")
        return value

    def resolved_run_date(self) -> dt.date:
        return self.run_date or dt.datetime.now(dt.timezone.utc).date()

    def over(self, defaults: dict) -> "PipelineConfig":
        """This config's explicitly given fields (at any depth) over `defaults` (a config as
        a dict, e.g. a deployment's parameters): a run asked for with only `top_k` keeps the
        deployment's workspace, source and every other setting."""
        return PipelineConfig.model_validate(_merged(defaults, self.model_dump(mode="json", exclude_unset=True)))

    def workspace_path(self) -> Path:
        return Path(self.workspace).expanduser().resolve()


def _merged(base: dict, top: dict) -> dict:
    return base | {key: _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict)
                   else value for key, value in top.items()}


class Run(BaseModel):
    """One nightly run as every stage sees it: its config, with the run date and the
    workspace resolved. Stages take it as their first argument."""

    model_config = ConfigDict(frozen=True)

    config: PipelineConfig
    run_date: dt.date
    workspace: Path

    @classmethod
    def of(cls, config: PipelineConfig) -> "Run":
        return cls(config=config, run_date=config.resolved_run_date(), workspace=config.workspace_path())

    def partition(self, table: str) -> Path:
        """This run date's directory of `table` (snapshots, features, recommendations, ...)."""
        return partition(self.workspace, table, self.run_date)
