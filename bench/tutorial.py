"""Reference training throughput: the TensorFlow Recommenders basic retrieval tutorial.

Reproduces the model and input pipeline of "Recommending movies: retrieval"
(https://www.tensorflow.org/recommenders/examples/basic_retrieval), so that the
pipeline's own training speed can be compared against the setup TFRS itself teaches:

- user tower: `Sequential([StringLookup(vocabulary=unique_user_ids, mask_token=None),
  Embedding(len(unique_user_ids) + 1, dim)])`; the item tower is the same over item ids
  (strings, in place of the tutorial's movie titles);
- task: `tfrs.tasks.Retrieval(metrics=tfrs.metrics.FactorizedTopK(
  candidates=items.batch(128).map(movie_model)))`;
- model: a `tfrs.Model` whose `compute_loss` returns
  `self.task(user_embeddings, positive_movie_embeddings)`. The tutorial passes no
  `compute_metrics`, so the top-K metrics over every candidate are computed on every
  training step ("Note that, in this example, we evaluate the metrics during training as
  well as evaluation."). `train_metrics=False` gives the faster variant later TFRS
  tutorials use, `compute_metrics=not training`;
- optimiser `Adagrad(learning_rate=0.1)`;
- input: `from_tensor_slices({"user_id": ..., "movie_title": ...})
  .shuffle(100_000).batch(batch_size).cache()`: no prefetch, and since the cache sits
  after shuffle and batch, every epoch after the first replays the first epoch's batches.

Departures from the notebook, all for measuring: the batch size and embedding size are
parameters (the tutorial has 8192 and 32), the data is whatever `interactions` holds (no
train/test split, no evaluation), the shuffle is seeded, and `fit` runs with `verbose=0`
(no progress bar).

What is measured. The first epoch traces the graph and fills the shuffle buffer and the
cache, so only the epochs after it are timed. A Keras callback records the wall time of
each epoch (on_epoch_begin/end) and of each batch (on_train_batch_begin/end). tf_keras
hands a callback that does not declare `_supports_tf_logs` its batch logs as numpy values,
which waits for the step to finish, so each batch time is the full step, and it includes
fetching the batch: `fit`'s step function calls `next(iterator)` inside the compiled step.

- `examples_per_second`: examples trained in the timed epochs / their wall time;
- `step_ms`: mean batch time over the timed epochs;
- `input_wait_share`: after training, the same dataset object (now served from its cache,
  as in the timed epochs) is iterated alone, in Python, for as many batches as were
  timed; that time divided by the summed batch times of the timed epochs. With no
  prefetch the input and the step run one after the other, so this is the share of the
  step spent getting the next batch. Python iteration adds a little per-batch overhead
  that the in-graph `next` does not pay, so it reads slightly high.

bench/speed.py runs it beside the pipeline's own model on the same examples.
"""

from __future__ import annotations

import time

import numpy as np
import polars as pl

from tasks.tfenv import keras, tf, tfrs

SHUFFLE_BUFFER = 100_000  # as in the tutorial (its training set has 80,000 ratings)
CANDIDATE_BATCH = 128  # movies.batch(128).map(movie_model), as in the tutorial


class MovielensModel(tfrs.Model):
    """The tutorial's two-tower model; `train_metrics=False` skips top-K metrics in training."""

    def __init__(self, user_model, movie_model, task, train_metrics: bool = True):
        super().__init__()
        self.movie_model: keras.Model = movie_model
        self.user_model: keras.Model = user_model
        self.task: keras.layers.Layer = task
        self.train_metrics = train_metrics

    def compute_loss(self, features, training=False):
        user_embeddings = self.user_model(features["user_id"])
        positive_movie_embeddings = self.movie_model(features["movie_title"])
        if self.train_metrics:
            # Exactly the tutorial's call: metrics computed in training and evaluation.
            return self.task(user_embeddings, positive_movie_embeddings)
        return self.task(user_embeddings, positive_movie_embeddings, compute_metrics=not training)


class _Timer(keras.callbacks.Callback):
    """Wall time of every epoch and of every batch within it."""

    def __init__(self):
        super().__init__()
        self.epochs: list[float] = []
        self.batches: list[list[float]] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.append([])
        self._epoch_started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(time.perf_counter() - self._epoch_started)

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.batches[-1].append(time.perf_counter() - self._batch_started)


def tutorial_throughput(
    interactions: pl.DataFrame,
    embedding_dim: int,
    batch_size: int,
    epochs: int = 2,
    seed: int = 42,
    train_metrics: bool = True,
) -> dict:
    """Train the tutorial's model on `interactions` and report its steady-state throughput.

    `interactions` has string columns `user_id` and `item_id`, one row per training example.
    Runs `fit` for `epochs` epochs (at least 2) and times every epoch after the first.
    Returns `examples_per_second`, `step_ms`, `input_wait_share` (see the module docstring
    for how each is measured), `epochs_timed`, `examples` (training examples per epoch),
    `batches_per_epoch`, `first_epoch_s`, `embedding_dim`, `batch_size` and `train_metrics`.
    """
    if epochs < 2:
        raise ValueError("epochs must be at least 2: the first epoch is not timed")
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)

    user_ids = interactions["user_id"].cast(pl.Utf8).to_numpy().astype(str)
    item_ids = interactions["item_id"].cast(pl.Utf8).to_numpy().astype(str)
    unique_user_ids = np.unique(user_ids)
    unique_movie_titles = np.unique(item_ids)
    movies = tf.data.Dataset.from_tensor_slices(unique_movie_titles)

    user_model = keras.Sequential([
        keras.layers.StringLookup(vocabulary=unique_user_ids, mask_token=None),
        # One more row for unknown ids, as in the tutorial.
        keras.layers.Embedding(len(unique_user_ids) + 1, embedding_dim),
    ])
    movie_model = keras.Sequential([
        keras.layers.StringLookup(vocabulary=unique_movie_titles, mask_token=None),
        keras.layers.Embedding(len(unique_movie_titles) + 1, embedding_dim),
    ])
    task = tfrs.tasks.Retrieval(
        metrics=tfrs.metrics.FactorizedTopK(candidates=movies.batch(CANDIDATE_BATCH).map(movie_model))
    )
    model = MovielensModel(user_model, movie_model, task, train_metrics=train_metrics)
    model.compile(optimizer=keras.optimizers.Adagrad(learning_rate=0.1))

    train = tf.data.Dataset.from_tensor_slices({
        "user_id": tf.constant(user_ids),
        "movie_title": tf.constant(item_ids),
    })
    cached_train = train.shuffle(SHUFFLE_BUFFER, seed=seed).batch(batch_size).cache()

    timer = _Timer()
    model.fit(cached_train, epochs=epochs, callbacks=[timer], verbose=0)

    steady_epochs = timer.epochs[1:]
    steady_batches = [t for epoch in timer.batches[1:] for t in epoch]
    train_seconds = sum(steady_batches)

    # Input alone: the same dataset object, now read from its cache, for the same batches.
    started = time.perf_counter()
    fetched = 0
    for _ in range(len(steady_epochs)):
        for _ in cached_train:
            fetched += 1
    input_seconds = time.perf_counter() - started
    assert fetched == len(steady_batches), (fetched, len(steady_batches))

    examples = len(user_ids)
    return {
        "examples_per_second": examples * len(steady_epochs) / sum(steady_epochs),
        "step_ms": 1000 * train_seconds / len(steady_batches),
        "input_wait_share": input_seconds / train_seconds,
        "epochs_timed": len(steady_epochs),
        "examples": examples,
        "batches_per_epoch": len(timer.batches[-1]),
        "first_epoch_s": timer.epochs[0],
        "embedding_dim": embedding_dim,
        "batch_size": batch_size,
        "train_metrics": train_metrics,
    }
