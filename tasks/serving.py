"""Registered versions as MLflow models: one night's recommender as an MLflow pyfunc model.

`save` writes the pyfunc model that evaluation logs to the night's run (artifact
`recommender/`, schemas/tables.py) and that both registered models' versions point at: this
file as its code (MLflow's "models from code": nothing is pickled), both SavedModels with
their vocabularies (`artifacts/models/`), the night's feature set (`artifacts/features/`:
the histories the night's lists were drawn from) and the list settings (`model_config`).
`Recommender.predict` calls `tasks.lists.recommend`, the one path from models to lists, so

    mlflow.pyfunc.load_model("models:/recflow-retrieval@champion").predict(
        pd.DataFrame({"user_id": ["user_42"]}), params={"k": 10})

answers with the list that night published for user_42 (when its models scored it), and
`mlflow models serve -m models:/recflow-retrieval@champion --env-manager local` serves the
same answers over HTTP. A row may carry `history` (item ids, oldest first): the user's
lists then come from those items instead of the stored history (a new user, or events
since the night).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
import polars as pl

from schemas.config import ListConfig
from schemas.tables import RECOMMENDER_FEATURES, RECOMMENDER_MODELS, ModelDir
from tasks.features import Features, load_features
from tasks.lists import history_similarity, recommend
from tasks.workspace import RecflowError

MODELS, FEATURES = Path(RECOMMENDER_MODELS).name, Path(RECOMMENDER_FEATURES).name  # the model's artifacts
OUTPUT = ["user_id", "rank", "item_id", "score", "retrieval_score", "because_item_id", "reason"]
# What the model imports besides recflow itself, pinned at the versions that saved it.
REQUIREMENTS = ["tensorflow", "tf-keras", "tensorflow-recommenders", "polars", "pyarrow", "scipy", "threadpoolctl",
                "faiss-cpu", "pydantic", "mlflow"]


class Recommender(mlflow.pyfunc.PythonModel):
    """Top-K lists for a batch of users: input columns `user_id` (string) and, optionally,
    `history` (item ids, oldest first); parameter `k` (default: the night's top_k). Output:
    one row per (user, rank), users in the order asked, columns OUTPUT."""

    def load_context(self, context) -> None:
        self.models = ModelDir(path=Path(context.artifacts[MODELS]))
        self.features = load_features(Path(context.artifacts[FEATURES]))
        self.top_k = int(context.model_config["top_k"])
        self.lists = ListConfig.model_validate(context.model_config["lists"])
        self.similarity = history_similarity(self.models, self.features, self.features.events)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        k = int((params or {}).get("k") or self.top_k)
        asked = pl.from_pandas(pd.DataFrame(model_input))
        if "user_id" not in asked.columns:
            raise RecflowError(f"the recommender needs a user_id column; got {asked.columns}")
        if "history" not in asked.columns:
            asked = asked.with_columns(pl.lit(None, dtype=pl.List(pl.String)).alias("history"))
        asked = asked.select(pl.col("user_id").cast(pl.String), pl.col("history").cast(pl.List(pl.String)))
        asked = asked.unique("user_id", keep="first", maintain_order=True).with_row_index("position")
        features, users, history = self._requests(asked)
        recs = recommend(self.models, features, users.to_numpy(), history, k, self.similarity, self.lists)
        order = asked.select("position", "user_id").with_columns(user_idx=users)
        return recs.join(order, on="user_idx").sort("position", "rank").select(OUTPUT).to_pandas()

    def _requests(self, asked: pl.DataFrame) -> tuple[Features, pl.Series, pl.DataFrame]:
        """(the features with a new user row per user asked with a history or unknown to the
        night, each asked user's user_idx, the events to score them from): a user asked
        without a history is scored from the night's events, the others from the history
        given (items unknown to the night are left out). The night's business rules hold
        for every answer: they travel with the features (tasks/lists.py applies them)."""
        stored = self.features.users.select("user_id", "user_idx")
        fresh = pl.col("history").is_not_null() | pl.col("user_idx").is_null()
        asked = asked.join(stored, on="user_id", how="left", maintain_order="left").with_columns(
            pl.when(fresh).then(fresh.cum_sum() + self.features.n_users).otherwise("user_idx")
            .cast(stored["user_idx"].dtype).alias("user_idx"),
            fresh.alias("fresh"),
        )
        added = asked.filter("fresh")
        events = self.features.events.select("user_idx", "item_idx", "timestamp")
        given = (  # events given with a request have no time: they count as just now
            added.select("user_idx", pl.col("history").alias("item_id")).explode("item_id")
            .join(self.features.items.select("item_id", "item_idx"), on="item_id", maintain_order="left")
            .select("user_idx", "item_idx", pl.lit(None).alias("timestamp"))
            .cast(events.schema)
        )
        stored_events = events.filter(pl.col("user_idx").is_in(asked.filter(~pl.col("fresh"))["user_idx"].implode()))
        users = pl.concat([stored, added.select(stored.columns)])
        history = pl.concat([stored_events, given]).sort("user_idx", maintain_order=True)
        # A user asked with a history, or unknown to the night's events, keeps their exclusions
        # under the new row.
        exclusions = self.features.exclusions
        carried = exclusions.join(added.select("user_id", pl.col("user_idx").alias("new_idx")), on="user_id").select(
            "user_id", pl.col("new_idx").alias("user_idx"), "item_idx")
        features = dataclasses.replace(self.features, users=users,
                                       exclusions=pl.concat([exclusions, carried.cast(exclusions.schema)]))
        return features, asked["user_idx"], history


def save(path: Path, models: ModelDir, features: Path, top_k: int, lists: ListConfig) -> None:
    """Write the pyfunc model of `models` scoring from the feature set at `features` to
    `path` (a new directory)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "user_id"), ColSpec(Array("string"), "history", required=False)]),
        outputs=Schema([ColSpec("string", "user_id"), ColSpec("integer", "rank"), ColSpec("string", "item_id"),
                        ColSpec("float", "score"), ColSpec("float", "retrieval_score"),
                        ColSpec("string", "because_item_id", required=False), ColSpec("string", "reason")]),
        params=ParamSchema([ParamSpec("k", "long", top_k)]),
    )
    popular = pl.read_parquet(features / "items.parquet").sort("popularity", descending=True)["item_id"].head(2)
    example = pd.DataFrame({"user_id": ["a-new-user"], "history": [popular.to_list()]})  # no real user's id
    logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)  # "cannot resolve pip" (uv has none)
    with tempfile.TemporaryDirectory() as scratch:  # MLflow names each artifact after its directory
        artifacts = {name: Path(scratch) / name for name in (MODELS, FEATURES)}
        shutil.copytree(models.path, artifacts[MODELS], ignore=shutil.ignore_patterns("evaluation"))
        shutil.copytree(features, artifacts[FEATURES], ignore=shutil.ignore_patterns("_*"))
        mlflow.pyfunc.save_model(
            path, python_model=__file__, artifacts={name: str(where) for name, where in artifacts.items()},
            model_config={"top_k": top_k, "lists": lists.model_dump(mode="json")}, signature=signature,
            input_example=example, pip_requirements=[f"{name}=={version(name)}" for name in REQUIREMENTS],
        )


# MLflow loads the model by running this file ("models from code"): nothing is unpickled.
mlflow.models.set_model(Recommender())
