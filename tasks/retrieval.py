"""Retrieval: a TFRS two-tower model that narrows the catalogue to a few candidates per user.

Fourth stage of the nightly DAG. The query tower reads the user id and the user's recent
history (attention-pooled item representations plus the latest item); the candidate tower
represents an item by its id, categories and title tokens, and the history encoder shares
it. Training is next-item prediction on the `fit` split with in-batch softmax, corrected
for how often each item appears as a sampled negative (log-Q), and stops early on recall
over the `valid` split. The export is one SavedModel with two signatures, `query` and
`candidates`, that scoring and the champion gate load without this module's classes.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
from prefect import task
from threadpoolctl import threadpool_limits

from schemas.config import FeatureConfig, RetrievalConfig
from schemas.tables import FeatureSet, TrainedModel
from tasks.features import Features, event_histories, load_features, save_vocabulary, user_histories

log = logging.getLogger(__name__)

RECALL_AT = 50  # cut-off of the validation recall that early stopping watches
BLOCK_SCORES = 2**23  # scores per block in `retrieve` (32 MiB of float32)


def train_retrieval(
    feature_set: FeatureSet,
    models: Path,
    cfg: RetrievalConfig,
    features_cfg: FeatureConfig,
    seed: int,
    warm_from: Path | None = None,
) -> TrainedModel:
    """Train the two-tower model on `fit`, stop on `valid` recall; export to models/retrieval.

    The vocabularies the model was trained with are saved beside it, in models/vocab. With
    `warm_from` (a models directory, the champion's) training starts from its weights.
    """
    from tasks import towers
    from tasks.tfenv import keras, seed_everything

    started = time.perf_counter()
    seed_everything(seed)
    strategy = distribution(cfg)  # first: logical devices can only be set before TensorFlow runs an op
    features = load_features(feature_set.path)
    length = features_cfg.history_length
    dataset, steps = training_batches(training_examples(features, length), cfg.batch_size, seed,
                                      cfg.max_examples_per_epoch)
    with strategy.scope():
        model = towers.TwoTower(features, length, cfg)
        if warm_from is not None:
            warm_start(model, warm_from, features)
        model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate))
    validation = towers.EpochMetric("val_recall", _validation_recall(features, length))
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_recall", mode="max", patience=cfg.patience, restore_best_weights=True
    )
    history = model.fit(dataset, epochs=cfg.max_epochs, steps_per_epoch=steps, callbacks=[validation, stopper], verbose=0)
    best = int(np.argmax(history.history["val_recall"]))
    out = models / "retrieval"
    export(model, out)
    save_vocabulary(features, models / "vocab")
    metrics = {
        f"valid_recall_at_{RECALL_AT}": float(history.history["val_recall"][best]),
        "train_loss": float(history.history["loss"][best]),
    }
    log.info("retrieval: %d epochs, best %d, %s", len(history.history["loss"]), best + 1, metrics)
    curves = {"train loss": history.history["loss"], f"valid recall@{RECALL_AT}": history.history["val_recall"]}
    return TrainedModel(
        path=out, epochs=best + 1, seconds=time.perf_counter() - started, metrics=metrics,
        history={name: [float(v) for v in values] for name, values in curves.items()},
    )


def distribution(cfg: RetrievalConfig):
    """The tf.distribute strategy `cfg.strategy` names; batches are split across its replicas.

    "mirrored" uses this machine's GPUs, or without one `cfg.devices` logical CPU devices
    (set before TensorFlow first runs an op, so a process that trains several times keeps
    the first run's devices); "multi_worker" reads the cluster from TF_CONFIG (one worker
    without it). Each replica takes its share of the batch, and its in-batch negatives
    come from that share.
    """
    from tasks.tfenv import tf

    if cfg.strategy == "default":
        return tf.distribute.get_strategy()
    if cfg.strategy == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif tf.config.list_physical_devices("GPU"):
        strategy = tf.distribute.MirroredStrategy()
    else:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cfg.devices)
        except RuntimeError:  # TensorFlow already ran in this process: keep its devices
            log.warning("retrieval: TensorFlow is already initialised; mirroring over its existing CPU devices")
        strategy = tf.distribute.MirroredStrategy([device.name for device in tf.config.list_logical_devices("CPU")])
    log.info("retrieval: %s with %d replica(s)", type(strategy).__name__, strategy.num_replicas_in_sync)
    return strategy


def training_examples(features: Features, length: int) -> dict[str, np.ndarray]:
    """One example per `fit` event: the user, their `length` previous items, the item and
    its sampling probability as an in-batch negative (for the log-Q correction)."""
    fit = features.events.filter(pl.col("split") == "fit")
    popularity = features.item_popularity
    sampling_probability = (popularity / popularity.sum()).astype(np.float32)
    return {
        "user_idx": fit["user_idx"].to_numpy(),
        "history": event_histories(fit, length),
        "item_idx": fit["item_idx"].to_numpy(),
        "sampling_probability": sampling_probability[fit["item_idx"].to_numpy()],
    }


def training_batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int, max_examples: int):
    """(endless dataset of batches, steps per epoch) over same-length example `arrays`.

    Each pass over the examples is a fresh seeded permutation whose batches are gathered
    from the arrays in memory: tf.data handles one element per batch, not per example,
    so the input never holds training back. An epoch is at most `max_examples` examples;
    the next one goes on through the permutation.
    """
    from tasks.tfenv import tf

    n = len(arrays["item_idx"])
    size = min(batch_size, n)
    per_pass = n // size
    tensors = {name: tf.constant(values) for name, values in arrays.items()}

    def one_pass(number):
        order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=tf.stack([tf.constant(seed, tf.int64), number]))
        return tf.data.Dataset.from_tensor_slices(tf.reshape(order[: per_pass * size], [per_pass, size]))

    dataset = (
        tf.data.Dataset.range(2**62)
        .flat_map(one_pass)
        .map(lambda rows: {name: tf.gather(values, rows) for name, values in tensors.items()})
        .prefetch(2)
    )
    return dataset, max(1, min(per_pass, max_examples // size))


def warm_start(model, champion: Path, features: Features) -> int:
    """Start `model` from the retrieval weights in `champion` (a models directory).

    User and item id embeddings are copied row by row through the two vocabularies (ids the
    champion never saw keep their fresh initialisation); the history encoder's and the
    projection's weights are copied when their shapes match. Category and title-token
    tables are left fresh: their indices are rebuilt every night. Returns the number of
    tensors copied.
    """
    from tasks.score import index_map, model_user_map
    from tasks.tfenv import tf

    model.query_model({"user_idx": np.zeros(1, np.int32), "history": np.zeros((1, model.history_length), np.int32)})
    old = tf.saved_model.load(str(champion / "retrieval")).query_model
    new = model.query_model
    vocab = champion / "vocab"
    copied = 0
    for new_table, old_table, rows in (
        (new.users.embeddings, old.users.embeddings, model_user_map(champion, features)),
        (new.items.ids.embeddings, old.items.ids.embeddings,
         index_map(features.items, pl.read_parquet(vocab / "items.parquet"), "item_id", "item_idx")),
    ):
        values, known = new_table.numpy(), rows > 0
        values[known] = old_table.numpy()[rows[known]]
        new_table.assign(values)
        copied += 1
    for name in ("positions", "self_attention", "norm", "gru", "attention", "project"):
        if hasattr(new, name) and hasattr(old, name):
            pairs = list(zip(getattr(new, name).variables, getattr(old, name).variables))
            if all(a.shape == b.shape for a, b in pairs):
                for target, source in pairs:
                    target.assign(source)
                copied += len(pairs)
    log.info("retrieval: warm start from %s, %d tensors copied", champion, copied)
    return copied


def retrieve(
    queries: np.ndarray,
    item_embeddings: np.ndarray,
    exclude: tuple[np.ndarray, np.ndarray],
    n: int,
    block: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-`n` items for each query row, in blocks of `block` rows.

    `item_embeddings` row 0 is the padding item and is never returned; `exclude` holds
    (row, item) pairs that must not be returned (items the user already interacted with).
    Memory stays bounded whatever the sizes: by default a block holds about BLOCK_SCORES
    scores, and two threads score blocks side by side (BLAS and numpy's partition
    release the GIL). BLAS itself is set to one thread, for this whole process: scores
    then never depend on how many threads BLAS has (Dask workers start with
    OMP_NUM_THREADS=1), so a sharded run writes the same numbers as a single process.
    """
    _single_threaded_blas()
    n = min(n, item_embeddings.shape[0] - 1)
    if n <= 0:
        return np.zeros((queries.shape[0], 0), np.int64), np.zeros((queries.shape[0], 0), np.float32)
    block = block or max(16, BLOCK_SCORES // item_embeddings.shape[0])
    rows, items = exclude
    order = np.argsort(rows, kind="stable")
    rows, items = rows[order], items[order]
    top_items = np.zeros((queries.shape[0], n), dtype=np.int64)
    top_scores = np.zeros((queries.shape[0], n), dtype=np.float32)

    def one_block(start: int) -> None:
        stop = min(start + block, queries.shape[0])
        scores = queries[start:stop] @ item_embeddings.T
        scores[:, 0] = -np.inf
        low, high = np.searchsorted(rows, [start, stop])
        scores[rows[low:high] - start, items[low:high]] = -np.inf
        part = np.argpartition(scores, -n, axis=1)[:, -n:]
        part_scores = np.take_along_axis(scores, part, axis=1)
        ranked = np.argsort(-part_scores, axis=1, kind="stable")
        top_items[start:stop] = np.take_along_axis(part, ranked, axis=1)
        top_scores[start:stop] = np.take_along_axis(part_scores, ranked, axis=1)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(one_block, range(0, queries.shape[0], block)))
    return top_items, top_scores


_blas = threading.Lock()


def _single_threaded_blas() -> None:
    """Set BLAS to one thread, once per process (retrieve parallelises over blocks itself)."""
    with _blas:
        if not getattr(_single_threaded_blas, "done", False):
            threadpool_limits(1, user_api="blas")
            _single_threaded_blas.done = True


class RetrievalBundle:
    """An exported retrieval SavedModel, loaded for scoring: queries in, top-N items out."""

    def __init__(self, saved_model, item_embeddings: np.ndarray):
        self.saved_model = saved_model
        self.item_embeddings = item_embeddings

    @classmethod
    def load(cls, path: Path) -> "RetrievalBundle":
        from tasks.tfenv import tf

        saved_model = tf.saved_model.load(str(path))
        n_items = int(np.load(path / "n_items.npy"))
        items = saved_model.signatures["candidates"](tf.range(n_items + 1, dtype=tf.int32))["embedding"].numpy()
        return cls(saved_model, items)

    @property
    def history_length(self) -> int:
        return int(self.saved_model.signatures["query"].structured_input_signature[1]["history"].shape[1])

    def queries(self, user_idx: np.ndarray, history: np.ndarray, block: int = 8192) -> np.ndarray:
        signature = self.saved_model.signatures["query"]
        parts = [
            signature(user_idx=user_idx[i : i + block].astype(np.int32), history=history[i : i + block].astype(np.int32))[
                "embedding"
            ].numpy()
            for i in range(0, user_idx.size, block)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.item_embeddings.shape[1]), np.float32)

    def retrieve(
        self, user_idx: np.ndarray, history: np.ndarray, exclude: tuple[np.ndarray, np.ndarray], n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        return retrieve(self.queries(user_idx, history), self.item_embeddings, exclude, n)


def export(model, out: Path) -> None:
    """Save both towers as one SavedModel with `query` and `candidates` signatures."""
    from tasks.tfenv import tf

    module = tf.Module()
    module.query_model, module.candidate_model = model.query_model, model.candidate_model
    length = model.history_length

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, length], tf.int32)])
    def query(user_idx, history):
        return {"embedding": module.query_model({"user_idx": user_idx, "history": history})}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)])
    def candidates(item_idx):
        return {"embedding": module.candidate_model(item_idx)}

    module.query, module.candidates = query, candidates
    tf.saved_model.save(module, str(out), signatures={"query": query, "candidates": candidates})
    np.save(out / "n_items.npy", np.int64(model.candidate_model.items.ids.input_dim - 1))


# --- validation --------------------------------------------------------------------


def _validation_recall(features: Features, length: int):
    """A function of the model: recall@RECALL_AT of `valid` items, querying with `fit` history."""
    from tasks.evaluate import ranking_metrics

    fit = features.events.filter(pl.col("split") == "fit")
    valid = features.events.filter(pl.col("split") == "valid")
    users = features.sampled(np.unique(valid["user_idx"].to_numpy()))
    history = user_histories(fit, features.n_users, length)[users]
    all_items = np.arange(features.n_items + 1, dtype=np.int32)
    exclude = rows_of(users, fit)
    truth = valid.filter(pl.col("user_idx").is_in(users.tolist())).select(
        pl.col("user_idx").alias("user"), pl.col("item_idx").alias("item")
    )

    def recall(model) -> float:
        queries = model.query_model({"user_idx": users.astype(np.int32), "history": history}).numpy()
        items = model.candidate_model(all_items).numpy()
        top, _ = retrieve(queries, items, exclude, RECALL_AT)
        return ranking_metrics(as_table(users, top), truth, RECALL_AT, features.n_items)["recall"]

    return recall


def rows_of(users: np.ndarray, events: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(row in `users`, item) for the events of the users listed in sorted `users`."""
    event_users = events["user_idx"].to_numpy()
    row = np.minimum(np.searchsorted(users, event_users), max(users.size - 1, 0))
    known = users[row] == event_users if users.size else np.zeros(event_users.size, bool)
    return row[known], events["item_idx"].to_numpy()[known]


def as_table(users: np.ndarray, top: np.ndarray) -> pl.DataFrame:
    k = top.shape[1]
    return pl.DataFrame(
        {
            "user": np.repeat(users, k),
            "item": top.ravel(),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), users.size),
        }
    )


@task(name="train_retrieval")
def train_retrieval_task(
    feature_set: FeatureSet,
    models: Path,
    cfg: RetrievalConfig,
    features_cfg: FeatureConfig,
    seed: int,
    warm_from: Path | None = None,
) -> TrainedModel:
    return train_retrieval(feature_set, models, cfg, features_cfg, seed, warm_from)
