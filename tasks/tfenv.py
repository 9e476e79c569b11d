"""The one place that sets TensorFlow up.

TFRS 0.7.x refuses Keras 3, so `TF_USE_LEGACY_KERAS=1` must be set before TensorFlow is
first imported. Stages that train or score import from here, inside their functions, so
`recflow --help` and the data stages never pay for importing TensorFlow.
"""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tensorflow_recommenders as tfrs  # noqa: E402
import tf_keras as keras  # noqa: E402

tf.get_logger().setLevel("ERROR")


def seed_everything(seed: int) -> None:
    """Same input and seed give the same model: seeded initialisers, shuffles and ops."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


__all__ = ["keras", "seed_everything", "tf", "tfrs"]
