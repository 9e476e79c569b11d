"""Retrieval: a TFRS two-tower model that narrows the catalogue to a few candidates per user.

Fourth stage of the nightly DAG. The query tower reads the user's recent
history (attention-pooled item representations plus the latest item); the candidate tower
represents an item by its id, categories and title tokens, and the history encoder shares
it. Training predicts the next item at every place of each history window in one pass,
with a softmax over the batch's other targets corrected for how often each item appears
among them (log-Q), and stops early on recall over the `valid` split; the model served is
that model trained on, for as many epochs again, on every event. Each export is one
SavedModel with two signatures, `query` and `candidates`, that scoring and the champion
gate load without this module's classes.

The stage trains into a staging models directory; the ranking stage adds the ranker and
publishes the directory as models/<key>/, the key being the hash of the features, the
models' and candidates' config, the seed and the warm-start source.
"""

from __future__ import annotations

import logging
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl

from schemas.config import RetrievalConfig, Run
from schemas.tables import FeatureSet, ModelDir, ModelSet, TrainedModel
from tasks import privacy, tracking
from tasks.features import Features, event_histories, load_features, save_vocabulary, user_histories
from tasks.inference import (N_ITEMS, approximate, as_table, item_graph, model_item_map, model_user_map, query_blocks,
                             retrieve, rows_of, write_graph)
from tasks.metrics import ranking_metrics
from tasks.stage import stage
from tasks.workspace import RecflowError, reuse, stage_key, temp_dir

log = logging.getLogger(__name__)

RECALL_AT = 50  # cut-off of the validation recall that early stopping watches
GROUPED = 16  # batches whose windows training_batches sorts by length together
VALIDATION_GRAPH_PARTS = 2  # validation's graphs of the epoch's items, built side by side (item_graph)


def train_retrieval(run: Run, features: FeatureSet) -> TrainedModel:
    """Train the two-tower model on `fit`, stopping on `valid` recall; then train it on, for
    as many epochs again, on every event: the model served. Both go to a staging
    models directory with the vocabularies they were trained with (and the privacy
    settings of their data). With `retrieval.warm_start`, training starts from the
    champion's weights.

    The `fit` model is what the ranker learns from and what the evaluation judges: it has
    not seen the `valid` and `test` events. The served model has: a user's latest events
    say most about their next one (on e-commerce reviews, training on them too lifts the
    two-tower lists by a third), and the ranker's features then describe the next item
    after a model's training data at serving as in ranker training.

    When models/<key> already holds models trained from the same features, config, seed and
    warm-start source, they are reused instead.
    """
    cfg = run.config.retrieval
    warm = _warm_start_source(run)
    key = stage_key("models", features.key, cfg, run.config.candidates, run.config.ranking, run.config.seed,
                    warm.name if warm else None)
    if (found := reuse(ModelDir.of(run.workspace, key).path, key, ModelSet)) is not None:
        return found.retrieval.model_copy(update={"reused": True})
    started = time.perf_counter()
    staging = ModelDir(path=temp_dir(run.workspace, "models"))
    if cfg.strategy == "multi_worker":
        epochs, history = _on_workers(run, features.path, warm, staging)
    else:
        epochs, history = _train_and_export(run, features.path, warm, staging)
    metrics = {
        f"valid_recall_at_{RECALL_AT}": float(history["val_recall"][epochs - 1]),
        "train_loss": float(history["loss"][epochs - 1]),
    }
    log.info("retrieval: %d epochs on fit, best %d, %s", len(history["loss"]), epochs, metrics)
    privacy.record(staging, run.config.privacy, run.workspace)
    curves = {"train loss": history["loss"], f"valid recall@{RECALL_AT}": history["val_recall"]}
    return TrainedModel(
        key=key, path=staging.retrieval_path, epochs=epochs, seconds=time.perf_counter() - started, metrics=metrics,
        history={name: [float(v) for v in values] for name, values in curves.items()},
        warm_start_from=warm.name if warm else None,
    )


def _train_and_export(run: Run, features_path: Path, warm: ModelDir | None, staging: ModelDir) -> tuple[int, dict]:
    """(epochs kept, per-epoch logs of the `fit` model): the stage's training, in this
    process or in each worker of a multi-worker job. Trains the `fit` model until
    validation recall stops improving and exports it, then trains it on every event for as
    many epochs again and exports that as the served model, to `staging` with the
    vocabularies. In a multi-worker job every worker trains and exports (saving takes them
    all), but only the chief's exports go to `staging`."""
    cfg, length = run.config.retrieval, run.config.features.history_length
    strategy = distribution(cfg)  # first: logical devices can only be set before TensorFlow runs an op
    resolver = getattr(strategy, "cluster_resolver", None)
    chief = resolver is None or not resolver.task_id
    out = staging if chief else ModelDir(path=temp_dir(run.workspace, "models-worker"))
    loaded = load_features(features_path)
    searched_by_graph = approximate(cfg.index, loaded.n_items)
    fit = loaded.events.filter(pl.col("split") == "fit")
    model, history, epochs = _train(run, loaded, fit, strategy, warm, _validation_recall(loaded, length,
                                                                                         searched_by_graph))
    export(model, out.fit_retrieval_path, searched_by_graph)
    _train_on(run, model, loaded, epochs)
    export(model, out.retrieval_path, searched_by_graph)
    log.info("retrieval: served model: the fit model trained on for %d epochs on all %d events", epochs,
             loaded.events.height)
    if chief:
        save_vocabulary(loaded, staging)
    else:
        shutil.rmtree(out.path)
    return epochs, {name: [float(v) for v in values] for name, values in history.items()}


def _on_workers(run: Run, features_path: Path, warm: ModelDir | None, staging: ModelDir) -> tuple[int, dict]:
    """_train_and_export on `retrieval.workers` processes under MultiWorkerMirroredStrategy,
    started by Ray Train's TensorflowTrainer (which gives each its TF_CONFIG) on the Ray
    cluster `retrieval.cluster`, or on one it starts on this machine for the stage. The
    workers read the features from the workspace, so every one trains on the same data and
    vocabularies; the global batch stays `retrieval.batch_size`. A worker that fails fails
    the stage, and the staging directory is never published."""
    from tasks import tfenv  # noqa: F401 ray.train.tensorflow imports TensorFlow: tf-keras must come first

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # Ray would fold the epochs' progress lines into one
    import ray
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    cfg = run.config.retrieval
    scratch = temp_dir(run.workspace, "ray")
    job = ray.job_config.JobConfig(runtime_env={"env_vars": {
        "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "PREFECT_LOGGING_EXTRA_LOGGERS": ""}})
    # Ray's own loggers in its processes: errors only (without Ray's dashboard, its training
    # controller warns every few seconds that it cannot query actor states); the workers log
    # training's progress themselves (_worker).
    job.set_py_logging_config(ray.LoggingConfig(log_level="ERROR"))
    # a cluster started here schedules one worker per (logical) CPU: more workers than cores share them
    cpus = None if cfg.cluster else max(os.cpu_count() or 1, cfg.workers)
    ray.init(address=cfg.cluster, num_cpus=cpus, logging_level=logging.ERROR, job_config=job)
    try:
        log.info("retrieval: training on %d Ray Train workers", cfg.workers)
        TensorflowTrainer(
            _worker,
            train_loop_config={"run": run, "features": features_path, "warm": warm, "staging": staging,
                               "outcome": scratch / "outcome.json"},
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers),
            run_config=ray.train.RunConfig(name="retrieval", storage_path=str(scratch),
                                           failure_config=ray.train.FailureConfig(max_failures=0)),
        ).fit()
    except ray.train.TrainingFailedError as error:
        raise RecflowError(f"retrieval: multi-worker training failed: {_first_failure(error)}; nothing was "
                           "published") from None
    finally:
        ray.shutdown()
    epochs, history = json.loads((scratch / "outcome.json").read_text())
    shutil.rmtree(scratch)
    return epochs, history


def _first_failure(error: Exception) -> str:
    """One line on what failed a Ray Train job: a worker that died (the others then fail on
    their collective ops), else the first failed worker's error, else Ray's own."""
    failures = getattr(error, "worker_failures", None) or {}
    died = {rank: cause for rank, cause in failures.items() if hasattr(cause, "health_check_failure")}
    if died:
        rank, cause = min(died.items())
        return f"worker {rank} died ({type(cause.health_check_failure).__name__}: killed, out of memory or crashed)"
    rank, cause = min(failures.items()) if failures else (None, error)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    where = "" if rank is None else f"worker {rank}: "
    return f"{where}{type(cause).__name__}: {lines[-1] if lines else ''}"


def _worker(config: dict) -> None:
    """A Ray Train worker's training loop: _train_and_export; the chief writes the outcome."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s worker {rank}: %(message)s", "%H:%M:%S"))
    progress = logging.getLogger("tasks")  # the chief's progress; the other workers' warnings
    progress.handlers, progress.propagate = [handler], False
    progress.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    outcome = _train_and_export(config["run"], config["features"], config["warm"], config["staging"])
    if rank == 0:
        config["outcome"].write_text(json.dumps(outcome))


def _train(run: Run, features: Features, events: pl.DataFrame, strategy, warm: ModelDir | None, validation):
    """(model, per-epoch logs, epochs kept): a two-tower model trained on the windows of
    `events` until `validation` (a function of the model) stops improving, at most
    `retrieval.max_epochs` epochs; the best epoch's weights kept."""
    from tasks import towers
    from tasks.tfenv import seed_everything

    cfg, length = run.config.retrieval, run.config.features.history_length
    seed_everything(run.config.seed)
    dataset, steps = training_batches(training_examples(events, length), cfg.batch_size, run.config.seed,
                                      cfg.max_examples_per_epoch)
    with strategy.scope():
        model = towers.TwoTower(features, length, cfg, _item_counts(events, features))
        if warm is not None:
            warm_start(model, warm, features)
        model.compile(optimizer=towers.RowSparseAdam(cfg.learning_rate, model.penalties()))
    patience = max(cfg.patience, math.ceil(cfg.patience_examples / (steps * cfg.batch_size)))
    stopper = towers.EarlyStopping("val_recall", patience, cfg.min_improvement)
    history = model.fit(dataset, epochs=cfg.max_epochs, steps_per_epoch=steps, verbose=0,
                        callbacks=[towers.EpochMetric("val_recall", validation), stopper])
    return model, history.history, stopper.best_epoch + 1


def _train_on(run: Run, model, features: Features, epochs: int) -> None:
    """Train `model` (the `fit` model, its optimiser state kept) on the windows of every
    event for `epochs` epochs, its log-Q correction counting their items.

    Going on from the `fit` model, rather than training a fresh model on every event for as
    many epochs, gave better lists on ml-latest-small and as good on amazon-sports
    (docs/quality.md, "The served model")."""
    cfg = run.config.retrieval
    dataset, steps = training_batches(training_examples(features.events, run.config.features.history_length),
                                      cfg.batch_size, run.config.seed, cfg.max_examples_per_epoch)
    model.count_items(_item_counts(features.events, features))
    model.fit(dataset, epochs=epochs, steps_per_epoch=steps, verbose=0)


def _item_counts(events: pl.DataFrame, features: Features) -> np.ndarray:
    return np.bincount(events["item_idx"].to_numpy(), minlength=features.n_items + 1)


def _warm_start_source(run: Run) -> ModelDir | None:
    """The champion's models, when `retrieval.warm_start` asks for them and the champion
    may not have learned from a user now on the deletion list."""
    if not run.config.retrieval.warm_start:
        return None
    champion = tracking.champion_models(run.workspace)
    if champion is None or privacy.remembers(champion, run.config.privacy, run.workspace):
        return None
    return champion


def distribution(cfg: RetrievalConfig):
    """The tf.distribute strategy `cfg.strategy` names; batches are split across its replicas.

    "mirrored" uses this machine's GPUs, or without one `cfg.devices` logical CPU devices
    (set before TensorFlow first runs an op, so a process that trains several times keeps
    the first run's devices); "multi_worker" reads the cluster from TF_CONFIG, which Ray
    Train sets in each of its workers (_on_workers). Each replica takes its share of the
    batch, and scores it against the whole batch's targets (TwoTower.compute_loss).
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


def training_examples(events: pl.DataFrame, length: int) -> dict[str, np.ndarray]:
    """One example per window of `length` places of a user's `events` (sorted by user,
    time): the user, the window's items (newest first) and the item that followed each
    (`targets`). Windows tile each history from its newest event back, so every event but
    a user's first is the target of exactly one place."""
    users, items = events["user_idx"].to_numpy(), events["item_idx"].to_numpy()
    last = np.append(np.flatnonzero(users[1:] != users[:-1]), users.size - 1)  # each user's last event
    ends = (np.repeat(last, np.diff(np.append(0, last + 1))) - np.arange(users.size)) % length == 0
    ends &= np.insert(users[1:] == users[:-1], 0, False)  # a user's first event has nothing before it
    history = event_histories(events, length, np.flatnonzero(ends))
    targets = np.concatenate([items[ends, None], history[:, :-1]], axis=1).astype(np.int32)
    return {"user_idx": users[ends], "history": history, "targets": targets}


def training_batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int, max_examples: int):
    """(endless dataset of batches, steps per epoch) over the windows of `arrays`
    (training_examples), about `batch_size` next-item targets a batch.

    Each pass over the windows is a fresh seeded permutation, cut into batches of about
    `batch_size` targets. Within each run of GROUPED batches' worth of the permutation the
    windows are sorted by how many places they fill, and each batch is cut to its longest
    window, so the query tower computes few padded places: where most histories are short
    (e-commerce reviews: a 20-place window holds 7 events on average) it would otherwise
    compute almost three places for each target. Batches are then visited in a random
    order. tf.data handles one element per batch, not per example, so the input never
    holds training back. An epoch is at most `max_examples` targets; the next one goes on
    through the passes. tf.data's autotuning is off: it tunes nothing here (the prefetch
    is fixed), and its thread held the end of `fit` for ~12 s while the endless iterator
    shut down.
    """
    from tasks.tfenv import tf

    fill = (arrays["history"] > 0).sum(1)
    n, targets, length = len(fill), int(fill.sum()), arrays["history"].shape[1]
    group = max(1, round(GROUPED * batch_size * n / max(targets, 1)))  # windows in GROUPED batches
    tensors = {name: tf.constant(values) for name, values in arrays.items()}
    places = tf.constant(fill.astype(np.int32))

    def shuffle(size, number):
        return tf.random.experimental.stateless_shuffle(tf.range(size), seed=tf.stack([tf.constant(seed, tf.int64),
                                                                                       number]))

    def one_pass(number):
        run = tf.range(n) // group
        order = shuffle(n, number)
        order = tf.gather(order, tf.argsort(run * (length + 1) - tf.gather(places, order), stable=True))
        # targets so far within the run, so that a batch never spans two runs
        filled = tf.cumsum(tf.gather(places, order))
        filled -= tf.gather(tf.concat([[0], filled], 0), run * group)
        part = (filled - 1) // batch_size
        starts = (run[1:] != run[:-1]) | (part[1:] != part[:-1])  # where a new batch starts
        batch = tf.cumsum(tf.cast(tf.concat([[True], starts], 0), tf.int32)) - 1
        rows = tf.RaggedTensor.from_value_rowids(order, batch)
        rows = rows[: tf.maximum(rows.nrows() - 1, 1)]  # the pass's last batch is partial
        return tf.data.Dataset.from_tensor_slices(tf.gather(rows, shuffle(rows.nrows(), -number - 1)))

    def gather(rows):
        longest = tf.reduce_max(tf.gather(places, rows))
        return {name: tf.gather(values, rows)[:, :longest] if name in ("history", "targets") else tf.gather(values, rows)
                for name, values in tensors.items()}

    dataset = tf.data.Dataset.range(2**62).flat_map(one_pass).map(gather).prefetch(2)
    options = tf.data.Options()
    options.autotune.enabled = False
    # With several workers, tf.distribute splits each batch into one share per replica and
    # each worker takes its own: the same batches as one process.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options), max(1, round(min(targets, max_examples) / batch_size))


def warm_start(model, champion: ModelDir, features: Features) -> int:
    """Start `model` from the retrieval weights in `champion` (a models directory).

    Item (and, when both models have them, user) id embeddings are copied row by row
    through the two vocabularies (ids the champion never saw keep their fresh
    initialisation); the history encoder's and the projection's weights are copied when
    their shapes match. Category and title-token
    tables are left fresh: their indices are rebuilt every night. Returns the number of
    tensors copied.
    """
    from tasks.tfenv import tf

    model.query_model({"user_idx": np.zeros(1, np.int32), "history": np.zeros((1, model.history_length), np.int32)})
    old = tf.saved_model.load(str(champion.retrieval_path)).query_model
    new = model.query_model
    copied = 0
    tables = [(new.items.ids.embeddings, old.items.ids.embeddings, model_item_map(champion, features))]
    if getattr(new, "users", None) is not None and getattr(old, "users", None) is not None:
        tables.append((new.users.embeddings, old.users.embeddings, model_user_map(champion, features)))
    for new_table, old_table, rows in tables:
        values, known = new_table.numpy(), rows > 0
        values[known] = old_table.numpy()[rows[known]]
        new_table.assign(values)
        copied += 1
    for name in ("recency", "self_attention", "norm", "gru", "attention", "project"):
        if hasattr(new, name) and hasattr(old, name):
            pairs = list(zip(getattr(new, name).variables, getattr(old, name).variables))
            if all(a.shape == b.shape for a, b in pairs):
                for target, source in pairs:
                    target.assign(source)
                copied += len(pairs)
    log.info("retrieval: warm start from %s, %d tensors copied", champion, copied)
    return copied


def export(model, path: Path, with_graph: bool = False) -> None:
    """Save both towers as one SavedModel with `query` and `candidates` signatures at
    `path` (a models directory's retrieval path), and the size of the item vocabulary
    beside it; `with_graph`, the HNSW graph of its item embeddings too (every reader of
    the model then searches approximately)."""
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
    tf.saved_model.save(module, str(path), signatures={"query": query, "candidates": candidates})
    n_items = model.candidate_model.items.ids.input_dim - 1
    np.save(path / N_ITEMS, np.int64(n_items))
    if with_graph:
        write_graph(module.candidates(tf.range(n_items + 1, dtype=tf.int32))["embedding"].numpy(), path)


# --- validation --------------------------------------------------------------------


def _validation_recall(features: Features, length: int, with_graph: bool):
    """A function of the model: recall@RECALL_AT of `valid` items, querying with `fit`
    history; `with_graph`, approximately as the exported model will be searched, through
    HNSW graphs of the epoch's item embeddings (VALIDATION_GRAPH_PARTS of them, built side
    by side: they serve one search)."""
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
        items = model.candidate_model(all_items).numpy()
        queries = query_blocks(lambda ids, recent: model.query_model({"user_idx": ids, "history": recent}).numpy(),
                               users, history, items.shape[1])
        graph = item_graph(items, VALIDATION_GRAPH_PARTS) if with_graph else None
        top, _ = retrieve(queries, items, exclude, RECALL_AT, graph=graph)
        return ranking_metrics(as_table(users, top), truth, RECALL_AT, features.n_items)["recall"]

    return recall


train_retrieval_task = stage("train_retrieval", train_retrieval)
