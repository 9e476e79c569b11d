"""The training optimiser (Adam whose embedding updates touch only the rows a batch used), the
query tower's reading of a history at every place, early stopping, and the exported ranker."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from schemas.config import RankingConfig, RetrievalConfig
from tasks.towers import EarlyStopping, ItemEncoder, QueryTower, Ranker, RowSparseAdam, TwoTower
from tasks.tfenv import keras, tf

LR, BETA_1, BETA_2, EPSILON = 0.1, 0.9, 0.999, 1e-7


def _lookup_step(optimiser, table, rows, weights):
    """One step on the loss sum(weights * table[rows]): the gradient is IndexedSlices with
    a slice per lookup (repeated rows repeat)."""
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(table, rows) * weights)
    gradient = tape.gradient(loss, table)
    assert isinstance(gradient, tf.IndexedSlices)
    optimiser.apply_gradients([(gradient, table)])


def test_an_embedding_step_moves_only_the_rows_looked_up_by_adam_on_their_summed_gradients():
    start = np.arange(12, dtype=np.float32).reshape(6, 2) / 10
    table = tf.Variable(start)
    optimiser = RowSparseAdam(LR)
    m, v, expected = np.zeros_like(start), np.zeros_like(start), start.copy()
    batches = [(np.array([1, 2, 1]), np.array([[1.0, -2.0], [0.5, 0.5], [1.0, 1.0]], np.float32)),
               (np.array([2, 4]), np.array([[3.0, 1.0], [-1.0, 0.25]], np.float32))]
    for step, (rows, weights) in enumerate(batches, start=1):
        _lookup_step(optimiser, table, rows, weights)
        gradient = np.zeros_like(start)
        np.add.at(gradient, rows, weights)
        used = np.unique(rows)
        m[used] = BETA_1 * m[used] + (1 - BETA_1) * gradient[used]
        v[used] = BETA_2 * v[used] + (1 - BETA_2) * gradient[used] ** 2
        alpha = LR * np.sqrt(1 - BETA_2**step) / (1 - BETA_1**step)
        expected[used] -= alpha * m[used] / (np.sqrt(v[used]) + EPSILON)
        np.testing.assert_allclose(table.numpy(), expected, rtol=1e-5)
    # Row 1 was used only in the first step and rows 0, 3, 5 never: none of them moved in the
    # second (Keras' Adam would have moved row 1 again on its decayed momentum).
    assert np.array_equal(table.numpy()[[0, 3, 5]], start[[0, 3, 5]])


def test_dense_weights_get_keras_adam():
    start = np.linspace(-1, 1, 8, dtype=np.float32).reshape(4, 2)
    ours, reference = tf.Variable(start), tf.Variable(start)
    for optimiser, weights in ((RowSparseAdam(LR), ours), (keras.optimizers.Adam(LR), reference)):
        for scale in (1.0, -0.5, 2.0):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(weights * scale))
            optimiser.apply_gradients([(tape.gradient(loss, weights), weights)])
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=1e-4)  # the fused kernel rounds differently
    assert not np.allclose(ours.numpy(), start)


def test_penalised_tables_move_every_row_as_keras_adam_does_with_the_l2_regulariser():
    """The penalty's gradient joins the batch's inside RowSparseAdam: the same steps as Keras'
    Adam on the loss plus Keras L2 regularisers, rows the batches never used included; two
    tables of one shape each get their own update, and so does a later optimiser's table
    once the first optimiser is gone (a night trains several models in one process)."""
    import gc

    l2, start = 0.05, np.arange(1, 13, dtype=np.float32).reshape(6, 2) / 10
    batches = [(np.array([1, 2, 1]), np.array([[1.0, -2.0], [0.5, 0.5], [1.0, 1.0]], np.float32)),
               (np.array([2, 4]), np.array([[3.0, 1.0], [-1.0, 0.25]], np.float32))]

    def train(penalised: bool) -> list[np.ndarray]:
        regulariser = None if penalised else keras.regularizers.l2(l2)
        tables = [keras.layers.Embedding(6, 2, embeddings_regularizer=regulariser) for _ in range(2)]
        optimiser = RowSparseAdam(LR, [(t, l2) for t in tables]) if penalised else keras.optimizers.Adam(LR)
        for scale, table in enumerate(tables, start=1):
            table.build((None,))
            table.embeddings.assign(start * scale)

        @tf.function
        def step(rows, weights):
            with tf.GradientTape() as tape:
                loss = sum(tf.reduce_sum(t(rows) * weights * s) for s, t in enumerate(tables, start=1))
                loss += tf.add_n([0.0] + [x for t in tables for x in t.losses])
            variables = [t.embeddings for t in tables]
            optimiser.apply_gradients(zip(tape.gradient(loss, variables), variables))

        for rows, weights in batches:
            step(rows, weights)
        assert not penalised or not any(t.losses for t in tables)
        return [t.embeddings.numpy() for t in tables]

    reference = train(penalised=False)
    for _ in range(2):  # the second time, the first optimiser and its tables are gone
        ours = train(penalised=True)
        gc.collect()
        for mine, theirs, scale in zip(ours, reference, (1, 2)):
            np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-6)
            assert (mine != start * scale).all()  # rows 0, 3 and 5 too


def test_the_exported_ranker_scores_the_mean_of_its_rankers_logits_each_with_the_discount(tmp_path):
    rng = np.random.default_rng(0)
    numeric = rng.normal(size=(40, 3)).astype(np.float32)
    inputs = {"user_idx": np.arange(40, dtype=np.int32) % 4, "item_idx": np.arange(40, dtype=np.int32) % 7,
              "numeric": numeric}
    rankers = []
    for seed in (1, 2, 3):
        keras.utils.set_random_seed(seed)
        ranker = Ranker(SimpleNamespace(n_users=4, n_items=7), RankingConfig(), popularity_feature=2)
        ranker.adapt(numeric)
        ranker(inputs)
        ranker.correction.kernel.assign(rng.normal(size=ranker.correction.kernel.shape))  # starts at zero
        ranker.popularity_discount.assign(0.3)
        rankers.append(ranker)
    logits = [ranker(inputs).numpy() for ranker in rankers]
    assert not np.allclose(logits[0], logits[1])
    rankers[0].export(tmp_path / "ranker", rankers[1:])
    score = tf.saved_model.load(str(tmp_path / "ranker")).signatures["score"]
    served = score(**{name: tf.constant(values) for name, values in inputs.items()})["score"].numpy()
    np.testing.assert_allclose(served, np.mean(logits, axis=0), rtol=1e-5, atol=1e-6)


def test_a_ranker_that_never_ran_exports_and_keeps_the_two_tower_order(tmp_path):
    numeric = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    ranker = Ranker(SimpleNamespace(n_users=4, n_items=7), RankingConfig(), popularity_feature=2)
    ranker.adapt(numeric)  # tiny data: no training, so its layers are built only when the export traces it
    ranker.export(tmp_path / "ranker")
    score = tf.saved_model.load(str(tmp_path / "ranker")).signatures["score"]
    served = score(user_idx=tf.constant([1, 2, 3, 1, 2], tf.int32), item_idx=tf.constant([1, 2, 3, 4, 5], tf.int32),
                   numeric=tf.constant(numeric))["score"].numpy()
    assert np.array_equal(np.argsort(-served), np.argsort(-numeric[:, 0]))  # the output layer starts at zero


def _features(n_items=9):
    rng = np.random.default_rng(0)
    categories = np.zeros((n_items + 1, 2), np.int32)
    categories[1:, 0] = rng.integers(1, 4, n_items)
    return SimpleNamespace(n_users=3, n_items=n_items, item_categories=categories,
                           item_title=np.zeros((n_items + 1, 1), np.int32))


@pytest.mark.parametrize("encoder", ["transformer", "attention", "gru"])
def test_the_query_at_each_place_of_a_history_is_the_query_served_for_the_history_from_there_on(encoder):
    """What lets training predict the next item at every place in one pass: the query at
    place p reads only the items from p on, at their distance from p, as serving reads a
    history that starts there."""
    keras.utils.set_random_seed(0)
    length = 5
    tower = QueryTower(ItemEncoder(_features(), 8), 3, length, 8, encoder, dropout=0.5)
    history = np.array([[4, 7, 2, 9, 0], [3, 0, 0, 0, 0]], np.int32)  # newest first, padded
    places = tower.sequence({"user_idx": np.array([1, 2], np.int32), "history": history}).numpy()
    for p in range(length):
        later = np.zeros_like(history)
        later[:, : length - p] = history[:, p:]
        served = tower({"user_idx": np.array([1, 2], np.int32), "history": later}).numpy()
        real = history[:, p] > 0
        np.testing.assert_allclose(places[real, p], served[real], rtol=1e-4, atol=1e-5)
    # training cuts a batch to its longest window: the padded places it leaves out change nothing
    cut = tower.sequence({"user_idx": np.array([1, 2], np.int32), "history": history[:, :4]}).numpy()
    np.testing.assert_allclose(cut, places[:, :4], rtol=1e-4, atol=1e-5)
    trained = tower.sequence({"user_idx": np.array([1, 2], np.int32), "history": history}, training=True).numpy()
    assert not np.allclose(trained, places)  # dropout acts in training only


def test_the_retrieval_loss_takes_the_batchs_other_targets_as_negatives_but_not_the_users_own_items():
    keras.utils.set_random_seed(0)
    features = _features()
    share = np.arange(10, dtype=np.float64)  # item i's share of the training events: i / 45
    model = TwoTower(features, 2, RetrievalConfig(embedding_dim=8, temperature=0.1), item_share=share)
    inputs = {"user_idx": np.array([1, 2], np.int32),
              "history": np.array([[2, 4], [6, 0]], np.int32),  # the second window has one place
              "targets": np.array([[5, 2], [2, 6]], np.int32)}
    loss = float(model.compute_loss(inputs))
    queries = model.query_model.sequence(inputs).numpy()[[0, 0, 1], [0, 1, 0]]
    targets = np.array([5, 2, 2])
    candidates = model.candidate_model(targets).numpy()
    # both towers output unit vectors: a score is a cosine
    np.testing.assert_allclose(np.linalg.norm(np.concatenate([queries, candidates]), axis=1), 1, rtol=1e-5)
    logits = (queries @ candidates.T / 0.1
              - np.log(3 * share[targets] / share.sum()))  # log-Q: each item's expected count in the batch
    # not negatives: the positive's own item elsewhere (2 as the third target), the window's other target
    left_out = np.array([[False, True, False], [True, False, True], [False, True, False]])
    logits[left_out] = -np.inf
    expected = np.mean(np.log(np.exp(logits).sum(1)) - np.diag(logits))
    assert loss == pytest.approx(expected, rel=1e-4)



def test_training_goes_on_with_the_log_q_correction_of_the_items_it_is_given():
    """The served model is the `fit` model trained on: its loss must count the items of every
    event, not those of `fit` it was traced with."""
    keras.utils.set_random_seed(0)
    inputs = {"user_idx": np.array([1, 2], np.int32), "history": np.array([[2, 4], [6, 3]], np.int32),
              "targets": np.array([[5, 2], [1, 6]], np.int32)}
    model = TwoTower(_features(), 2, RetrievalConfig(embedding_dim=8, dropout=0, l2=0), item_share=np.ones(10))
    model.compile(optimizer=RowSparseAdam(0.0))  # the weights stay: each fit reports the loss of the same model
    batches = tf.data.Dataset.from_tensors(inputs).repeat()
    before = model.fit(batches, epochs=1, steps_per_epoch=1, verbose=0).history["loss"][0]
    counts = np.arange(10, dtype=np.float64)
    model.count_items(counts)
    after = model.fit(batches, epochs=1, steps_per_epoch=1, verbose=0).history["loss"][0]
    assert after == pytest.approx(float(model.compute_loss(inputs)), rel=1e-5)
    assert after != pytest.approx(before, rel=1e-3)
    np.testing.assert_allclose(model.item_share.numpy(), counts / counts.sum(), rtol=1e-6)


# Run in a fresh process: logical devices can only be set before TensorFlow runs an op.
REPLICAS_SCRIPT = """
import numpy as np
from tasks.tfenv import keras, tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from schemas.config import RetrievalConfig
from tasks.towers import TwoTower
from tests.tasks.test_towers import _features

inputs = {"user_idx": np.array([1, 2, 1, 2], np.int32),
          "history": np.array([[2, 4, 1], [6, 0, 0], [3, 5, 0], [7, 8, 9]], np.int32),
          "targets": np.array([[5, 2, 4], [2, 6, 0], [4, 3, 0], [1, 7, 8]], np.int32)}
cfg = RetrievalConfig(embedding_dim=8, dropout=0, l2=0.01, user_embedding=True)
share = np.arange(10, dtype=np.float64)

def step(model, batch):
    with tf.GradientTape() as tape:
        loss = model.compute_loss(batch, training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    return loss, [tf.convert_to_tensor(g) for g in grads]

keras.utils.set_random_seed(0)
one = TwoTower(_features(), 3, cfg, item_share=share)
loss, grads = step(one, inputs)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    two = TwoTower(_features(), 3, cfg, item_share=share)
    two.compute_loss(inputs)
    two.set_weights(one.get_weights())
batch = next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(inputs))))
losses, per_replica = strategy.run(lambda b: step(two, b), args=(batch,))
shares = [len(strategy.experimental_local_results(batch["targets"])[r]) for r in range(2)]
summed = [sum(strategy.experimental_local_results(g)) for g in per_replica]
assert shares == [2, 2]
np.testing.assert_allclose(float(sum(strategy.experimental_local_results(losses))), float(loss), rtol=1e-5)
for a, b in zip(summed, grads):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
print("same")
"""


def test_two_replicas_compute_one_processs_loss_and_gradients_over_the_whole_batchs_negatives():
    """Under a distribution strategy each replica takes a share of the batch, and Keras sums
    their gradients: the shares' losses and gradients add up to one process's (the batch's
    other targets stay every query's negatives; the id tables' penalty is added to the sum, by
    RowSparseAdam)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    result = subprocess.run([sys.executable, "-c", REPLICAS_SCRIPT], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("same"), result.stderr[-3000:]


def test_early_stopping_counts_an_epoch_as_better_only_by_a_share_of_the_best_and_keeps_its_weights():
    model = keras.Sequential([keras.layers.Dense(1, input_shape=(1,))])
    stopper = EarlyStopping("recall", patience=2, min_improvement=0.01)
    stopper.set_model(model)
    stopper.on_train_begin()
    recalls = [0.10, 0.20, 0.201, 0.2015, 0.30]  # 0.201 and 0.2015: not 1% above 0.20
    for epoch, recall in enumerate(recalls):
        model.layers[0].bias.assign([recall])
        stopper.on_epoch_end(epoch, {"recall": recall})
        if model.stop_training:
            break
    stopper.on_train_end()
    assert (epoch, stopper.best_epoch) == (3, 1)
    assert model.layers[0].bias.numpy()[0] == pytest.approx(0.20)  # the weights of the epoch kept
