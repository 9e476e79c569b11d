"""The Keras/TFRS building blocks of both models: small layers the stages compose.

Imported only inside the training and scoring stages (it imports TensorFlow). Item,
query and candidate towers are separate objects; `TwoTower` and `Ranker` own only their
TFRS task and loss, as in TFRS itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from schemas.config import RankingConfig, RetrievalConfig
from tasks.features import Features
from tasks.tfenv import keras, tf, tfrs

log = logging.getLogger(__name__)


class ItemEncoder(keras.layers.Layer):
    """An item as the sum of its id, category and title-token embeddings (hybrid CF + content).

    The content tables ride along as constants, so a new item with categories or a title
    but few interactions still lands near similar items. (An item nobody has interacted
    with keeps its untrained id embedding: leaving it out made such items look typical of
    their genre and crowd the candidates, which cost 3% NDCG@10 on ml-latest-small.)
    """

    def __init__(self, features: Features, dim: int):
        super().__init__(name="item_encoder")
        self.dim = dim
        self.ids = keras.layers.Embedding(features.n_items + 1, dim)
        self.categories = keras.layers.Embedding(int(features.item_categories.max()) + 1, dim)
        self.tokens = keras.layers.Embedding(int(features.item_title.max()) + 1, dim)
        self.category_table = tf.constant(features.item_categories)
        self.token_table = tf.constant(features.item_title)

    def call(self, item_idx):
        return (
            self.ids(item_idx)
            + _masked_mean(self.categories, tf.gather(self.category_table, item_idx))
            + _masked_mean(self.tokens, tf.gather(self.token_table, item_idx))
        )


class QueryTower(keras.Model):
    """A user as their encoded recent history (newest first) and their latest item, and
    optionally their id.

    `sequence` reads a history at every place at once: the query at place p is what the
    items from p on (p and older) say, so training predicts the item after each place of a
    history in one pass (a next-item target at every position, as SASRec trains), and the
    query served is the one at place 0, after the whole history. Positions are relative (a
    learned bias per distance from the reading place), so the query at place p is exactly
    the query served for the history from p on: training and serving read alike.

    `encoder` picks how the history is read: "attention" pools item representations with
    learned attention weights (item and distance); "transformer" first runs a self-attention
    block over them (each item sees the older ones); "gru" reads them oldest to newest with
    a GRU. `dropout` drops parts of the history's item representations in training. An id
    embedding per user (`user_embedding`) learns only from that user's training events:
    with short histories it overfits (on e-commerce reviews with a median of six events it
    cost a quarter of the validation recall), and the history already carries the user, so
    it is off by default.
    """

    def __init__(self, items: ItemEncoder, n_users: int, length: int, dim: int, encoder: str,
                 user_embedding: bool = False, dropout: float = 0.0):
        super().__init__(name="query_tower")
        self.items = items
        self.encoder = encoder
        self.users = None
        if user_embedding:
            self.users = keras.layers.Embedding(n_users + 1, dim)
        self.recency = keras.layers.Embedding(length, 1)  # the pooling's bias per distance
        self.dropout = keras.layers.Dropout(dropout)
        if encoder == "transformer":
            self.self_attention = SelfAttention(dim, heads=2, length=length)
            self.norm = keras.layers.LayerNormalization()
        if encoder == "gru":
            self.gru = keras.layers.GRU(dim, return_sequences=True)
        self.attention = keras.layers.Dense(1)
        self.project = keras.layers.Dense(dim)
        places = np.arange(length)
        # older[p, j]: place j is place p or older (newest first), what the query at p may read
        self.older = tf.constant(places[None] >= places[:, None])
        self.distance = tf.constant(np.maximum(places[None] - places[:, None], 0))

    def call(self, inputs, training=False):
        """(batch, dim): the query after the whole history."""
        return self.sequence(inputs, training)[:, 0]

    def sequence(self, inputs, training=False):
        """(batch, length, dim): the query at every place of the history, unit length."""
        history = inputs["history"]
        length = tf.shape(history)[1]  # up to the model's: training cuts each batch to its longest window
        # Encode each distinct history item once per batch: histories repeat items heavily.
        distinct, position = tf.unique(tf.reshape(history, [-1]))
        items = tf.reshape(tf.gather(self.items(distinct), position), [-1, length, self.items.dim])
        items = self.dropout(items, training=training)
        present = history > 0
        visible = self.older[None, :length, :length] & present[:, None, :]  # (batch, place, place read)
        distance = self.distance[:length, :length]
        if self.encoder == "gru":
            encoded = tf.reverse(self.gru(tf.reverse(items, [1]), mask=tf.reverse(present, [1])), [1])
        else:
            values = items
            if self.encoder == "transformer":
                values = self.norm(items + self.self_attention(items, visible, distance))
            logits = (tf.squeeze(self.attention(values), -1)[:, None, :] + tf.squeeze(self.recency(distance), -1)
                      + tf.where(visible, 0.0, -1e9))
            any_history = tf.cast(tf.reduce_any(visible, -1, keepdims=True), tf.float32)
            encoded = tf.matmul(tf.nn.softmax(logits, axis=-1) * any_history, values)
        parts = [encoded, items]
        if self.users is not None:
            users = self.users(inputs["user_idx"])[:, None]
            parts.insert(0, tf.broadcast_to(users, tf.shape(items)))
        return tf.math.l2_normalize(self.project(tf.concat(parts, axis=-1)), -1)


class SelfAttention(keras.layers.Layer):
    """Multi-head self-attention over a padded sequence, as Keras' MultiHeadAttention
    computes it (query/key/value and output projections, scaled dot products), with the
    three input projections fused into one matrix product: on CPU this block is most of
    a training step, and the fused form runs it in about half the time."""

    def __init__(self, dim: int, heads: int, length: int):
        super().__init__(name="self_attention")
        self.dim, self.heads = dim, heads
        self.qkv = keras.layers.Dense(3 * dim)
        self.out = keras.layers.Dense(dim)
        self.bias = keras.layers.Embedding(length, heads)  # each head's bias per distance

    def call(self, x, visible, distance):
        """`x` (batch, length, dim); `visible` (batch, length, length) says which places
        each place may attend to (never padding); `distance` (length, length) how far apart
        two places are."""
        length, width = tf.shape(x)[1], self.dim // self.heads

        def heads(t):
            return tf.transpose(tf.reshape(t, [-1, length, self.heads, width]), [0, 2, 1, 3])

        query, key, value = (heads(t) for t in tf.split(self.qkv(x), 3, axis=-1))
        logits = (tf.matmul(query, key, transpose_b=True) * width**-0.5 + tf.transpose(self.bias(distance), [2, 0, 1])
                  + tf.where(visible, 0.0, -1e9)[:, None])
        mixed = tf.matmul(tf.nn.softmax(logits, axis=-1), value)
        return self.out(tf.reshape(tf.transpose(mixed, [0, 2, 1, 3]), [-1, length, self.dim]))


class CandidateTower(keras.Model):
    """An item's embedding, unit length as the query's: the two-tower score is a cosine."""

    def __init__(self, items: ItemEncoder):
        super().__init__(name="candidate_tower")
        self.items = items

    def call(self, item_idx):
        return tf.math.l2_normalize(self.items(item_idx), -1)


class RowSparseAdam(keras.optimizers.Adam):
    """Adam that updates only the embedding rows a batch used (as TF Addons' LazyAdam), and
    applies the id tables' L2 penalty.

    Keras' Adam decays the moments of every row of a table on every step, so a step costs
    more as the user and item vocabularies grow; here a row's moments and weights move only
    when the batch looked it up (its gradient slices, summed per row by Keras first), so a
    step costs about the same at 20,000 or 200,000 users (`bench/scale.py --training`).
    Dense weights get Keras' Adam, computed by TensorFlow's fused Adam kernel.

    `penalties` pairs embedding layers with their `l2`: l2 x the sum of the table's squared
    weights is added to the loss, so the table's gradient is dense and every row moves on
    every step. Its gradient is added here, in one XLA-compiled function with Adam's update
    (`_penalised_adam`) that reads the table and its moments once (as a Keras regulariser,
    the penalty's gradient, its sum with the batch's and Adam's update each took a pass: a
    training step at 150,000 items took 58 ms, now 42). It applies to the gradient the
    replicas summed, so it counts once under a distribution strategy.
    """

    def __init__(self, learning_rate, penalties: list = (), **adam):
        super().__init__(learning_rate, **adam)
        self._penalties = tuple(penalties)
        # One per optimiser: a traced function keeps the variables of its first call.
        self._penalised_adam = tf.function(_penalised_adam, jit_compile=True)

    def update_step(self, gradient, variable):
        step, dtype = tf.cast(self.iterations + 1, variable.dtype), variable.dtype
        index = self._index_dict[self._var_key(variable)]
        m, v = self._momentums[index], self._velocities[index]
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        lr, epsilon = tf.cast(self.learning_rate, dtype), tf.cast(self.epsilon, dtype)
        alpha = lr * tf.sqrt(1 - tf.pow(beta_2, step)) / (1 - tf.pow(beta_1, step))
        l2 = [l2 for table, l2 in self._penalties if self._var_key(table.embeddings) == self._var_key(variable)]
        if l2 and l2[0]:
            return self._penalised_adam(variable, m, v, tf.convert_to_tensor(gradient), tf.constant(l2[0], dtype),
                                        alpha, beta_1, beta_2, epsilon)
        if not isinstance(gradient, tf.IndexedSlices):  # Keras' Adam, in TensorFlow's fused kernel
            return tf.raw_ops.ResourceApplyAdam(
                var=variable.handle, m=m.handle, v=v.handle, beta1_power=tf.pow(beta_1, step),
                beta2_power=tf.pow(beta_2, step), lr=lr, beta1=beta_1, beta2=beta_2, epsilon=epsilon, grad=gradient)
        rows = gradient.indices
        m_rows = self.beta_1 * tf.gather(m, rows) + (1 - self.beta_1) * gradient.values
        v_rows = self.beta_2 * tf.gather(v, rows) + (1 - self.beta_2) * tf.square(gradient.values)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        variable.scatter_sub(tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + self.epsilon), rows))


def _penalised_adam(variable, m, v, gradient, l2, alpha, beta_1, beta_2, epsilon):
    """Adam's update for the gradient plus that of `l2` x the sum of the squared weights,
    as TensorFlow's fused kernel computes it, in one pass over the weights and moments."""
    gradient += (2 * l2) * variable
    m.assign_add((gradient - m) * (1 - beta_1))
    v.assign_add((tf.square(gradient) - v) * (1 - beta_2))
    variable.assign_sub(m * alpha / (tf.sqrt(v) + epsilon))


class TwoTower(tfrs.models.Model):
    """Retrieve O(hundreds) candidates from the whole catalogue: towers + retrieval loss.

    Each training example is a window of a user's history with the item that followed each
    place (`targets`, newest first): every place is a query and its next item the positive.
    Both towers output unit vectors, so an item's score is its cosine with the query (over
    `temperature` in the loss): with raw dot products, popular items grew long embeddings
    and crowded the lists (cosines lifted the two-tower lists' NDCG@10 by 7% on e-commerce
    reviews, and by 3% on ml-latest-small over 3 seeds). The negatives are the batch's
    other positives, each logit corrected by the log of how often its item is expected
    among them (log-Q: `item_share`, each item's share of the training events), leaving out
    the positive's own item and the other targets of its window (the user's own earlier and
    later items). Under a distribution strategy each replica computes its share of the
    batch against the whole batch's targets: the same loss and gradients as one process.
    """

    def __init__(self, features: Features, length: int, cfg: RetrievalConfig, item_share: np.ndarray | None = None):
        super().__init__()
        self.history_length = length
        items = ItemEncoder(features, cfg.embedding_dim)
        self.query_model = QueryTower(items, features.n_users, length, cfg.embedding_dim, cfg.history_encoder,
                                      cfg.user_embedding, cfg.dropout)
        self.l2 = cfg.l2
        self.candidate_model = CandidateTower(items)
        self.temperature = cfg.temperature
        self.count_items(features.item_popularity if item_share is None else item_share)

    def penalties(self) -> list:
        """The id tables and their `l2` penalty, which RowSparseAdam applies."""
        return [(table, self.l2) for table in (self.query_model.items.ids, self.query_model.users) if table is not None]

    def count_items(self, counts: np.ndarray) -> None:
        """Set the log-Q correction's item shares to `counts` (events per item) over their
        sum: the items of the events training goes on with."""
        self.item_share = tf.constant((counts / max(counts.sum(), 1)).astype(np.float32))
        self.train_function = None  # traced with the shares it read: the next fit traces afresh

    def compute_loss(self, inputs, training=False):
        places = inputs["history"] > 0  # a place with a history item has a target
        queries = tf.boolean_mask(self.query_model.sequence(inputs, training), places)
        targets = tf.boolean_mask(inputs["targets"], places)
        window = tf.boolean_mask(tf.broadcast_to(tf.range(tf.shape(places)[0])[:, None], tf.shape(places)), places)
        positives, items = tf.range(tf.size(targets)), self.candidate_model(targets)
        batch_targets, batch_windows, batch_items = targets, window, items
        replicas = tf.distribute.get_replica_context()
        if replicas is not None and replicas.num_replicas_in_sync > 1:
            # Each replica holds a share of the batch; its queries score the whole batch's targets,
            # so the negatives do not change with the number of replicas.
            sizes = replicas.all_gather(tf.stack([tf.shape(places)[0], tf.size(targets)])[None], 0)
            before = tf.reduce_sum(sizes[: replicas.replica_id_in_sync_group], 0)  # earlier replicas' windows, targets
            window, positives = window + before[0], positives + before[1]
            batch_targets, batch_windows, batch_items = (replicas.all_gather(t, 0) for t in (targets, window, items))
        n = tf.size(batch_targets)
        expected = tf.cast(n, tf.float32) * tf.gather(self.item_share, batch_targets)  # each item's count in the batch
        logits = tf.matmul(queries, batch_items, transpose_b=True) / self.temperature - tf.math.log(expected)[None]
        others = ((targets[:, None] == batch_targets[None]) | (window[:, None] == batch_windows[None])) & (
            positives[:, None] != tf.range(n)[None])
        logits = tf.where(others, -1e9, logits)
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(positives, logits)
        return tf.reduce_sum(losses) / tf.cast(n, tf.float32)  # this replica's share of the batch's mean


class Ranker(tfrs.models.Model):
    """Re-order each user's O(hundreds) candidates: a learned correction to the two-tower score.

    The logit is a learned multiple of the two-tower score plus a DCN-v2 network over user
    and item ids and the numeric features (tasks/candidates.py:FEATURES: both sources'
    scores, the rank in its source, item popularity, user activity, ...). The network's
    output layer starts at zero, so an untrained ranker keeps the two-tower order and
    training moves away from it only where the data says so. After training, a popularity
    discount may be set: the logit minus `popularity_discount` x the raw feature at
    `popularity_feature` (log(1 + the item's events)); it is 0 while training.
    """

    def __init__(self, features: Features, cfg: RankingConfig, popularity_feature: int):
        super().__init__()
        self.popularity_feature = popularity_feature
        self.popularity_discount = self.add_weight(name="popularity_discount", shape=(), initializer="zeros",
                                                   trainable=False)
        dim = cfg.embedding_dim
        self.use_ids = cfg.id_embeddings
        if self.use_ids:  # (unused tables would still cost: their l2 gradient touches every row on every step)
            self.users = keras.layers.Embedding(features.n_users + 1, dim)
            self.items = keras.layers.Embedding(features.n_items + 1, dim)
        self.l2 = cfg.l2
        self.normalise = keras.layers.Normalization(axis=-1)
        self.cross = [tfrs.layers.dcn.Cross() for _ in range(cfg.cross_layers)]
        self.deep = [keras.layers.Dense(64, activation="relu"), keras.layers.Dense(32, activation="relu")]
        self.correction = keras.layers.Dense(1, kernel_initializer="zeros")
        self.retrieval_weight = self.add_weight(name="retrieval_weight", shape=(), initializer="ones")
        # Listwise: softmax over each user's candidates, as the top-K metrics judge them.
        self.task = tfrs.tasks.Ranking(loss=keras.losses.CategoricalCrossentropy(from_logits=True))

    def penalties(self) -> list:
        """The id tables and their `l2` penalty, which RowSparseAdam applies."""
        return [(self.users, self.l2), (self.items, self.l2)] if self.use_ids else []

    def adapt(self, numeric: np.ndarray) -> None:
        """Learn the features' scale from `numeric` (pairs, features), in large batches (the
        default of 32 rows makes millions of pairs take minutes)."""
        self.normalise.adapt(numeric, batch_size=65_536)

    def call(self, inputs):
        """Logits shaped like `item_idx`: (pairs,) at serving, (users, candidates) in training."""
        shape = tf.shape(inputs["item_idx"])
        raw = tf.reshape(inputs["numeric"], [-1, self.normalise.mean.shape[-1]])
        numeric = self.normalise(raw)
        users = tf.reshape(tf.broadcast_to(inputs["user_idx"][..., None], shape) if len(inputs["item_idx"].shape) == 2
                           else inputs["user_idx"], [-1])
        x = numeric
        if self.use_ids:
            x = tf.concat([self.users(users), self.items(tf.reshape(inputs["item_idx"], [-1])), numeric], -1)
        x0 = x
        for layer in self.cross:
            x = layer(x0, x)
        for layer in self.deep:
            x = layer(x)
        logit = self.retrieval_weight * numeric[:, 0] + tf.squeeze(self.correction(x), -1)
        return tf.reshape(logit - self.popularity_discount * raw[:, self.popularity_feature], shape)

    def compute_loss(self, data, training=False):
        """Listwise loss over each list; `inputs["real"]` masks the places of a list that
        hold no candidate."""
        inputs, labels = data
        logits = tf.where(inputs["real"], self(inputs, training=training), -1e9)
        return self.task(labels=labels, predictions=logits, compute_metrics=False)

    def export(self, out, others: Sequence[Ranker] = ()) -> None:
        """Save a `score` signature: this ranker's logits, averaged with those of `others`
        (rankers of the same features) when given."""
        n_numeric = self.normalise.mean.shape[-1]
        rankers = [self, *others]

        @tf.function(
            input_signature=[
                tf.TensorSpec([None], tf.int32),
                tf.TensorSpec([None], tf.int32),
                tf.TensorSpec([None, n_numeric], tf.float32),
            ]
        )
        def score(user_idx, item_idx, numeric):
            inputs = {"user_idx": user_idx, "item_idx": item_idx, "numeric": numeric}
            return {"score": tf.add_n([ranker(inputs) for ranker in rankers]) / len(rankers)}

        # The module holds the rankers' variables, not the Keras models: saving those would
        # trace every layer's call for Keras' own loader (~1.5 s here, and slower loads).
        # Tracing first builds the layers of a ranker that never trained (tiny data).
        score.get_concrete_function()
        module = tf.Module()
        module.weights, module.score = [v for ranker in rankers for v in ranker.variables], score
        tf.saved_model.save(module, str(out), signatures={"score": score})


class EpochMetric(keras.callbacks.Callback):
    """Adds `name` = fn(model) to the epoch logs, for early stopping on a real metric."""

    def __init__(self, name: str, fn: Callable[[keras.Model], float]):
        super().__init__()
        self.metric_name, self.fn = name, fn

    def on_epoch_end(self, epoch, logs=None):
        value, strategy = self.fn(self.model), self.model.distribute_strategy
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # every worker must take the same decisions on it (early stopping), and machines may round differently
            value = float(strategy.reduce("MEAN", strategy.run(lambda: tf.constant(value, tf.float64)), axis=None))
        logs[self.metric_name] = value
        log.info("epoch %d: loss %.1f, %s %.4f", epoch + 1, logs["loss"], self.metric_name, logs[self.metric_name])


class EarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' early stopping on a metric to maximise, keeping the best epoch's weights, where
    an epoch counts as better only when it beats the best so far by `min_improvement` of it
    (relative, as the metric's level differs from one dataset to the next)."""

    def __init__(self, monitor: str, patience: int, min_improvement: float):
        super().__init__(monitor=monitor, mode="max", patience=patience, restore_best_weights=True)
        self.min_improvement = min_improvement

    def _is_improvement(self, monitor_value, reference_value):
        return reference_value == -np.inf or monitor_value > reference_value * (1 + self.min_improvement)


def _masked_mean(embedding, tokens):
    mask = tf.cast(tokens > 0, tf.float32)[..., None]
    return tf.reduce_sum(embedding(tokens) * mask, axis=-2) / tf.maximum(tf.reduce_sum(mask, axis=-2), 1.0)
