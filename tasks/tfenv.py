"""The one place that sets TensorFlow up.

TFRS 0.7.x refuses Keras 3, so `TF_USE_LEGACY_KERAS=1` must be set before TensorFlow is
first imported. Stages that train or score import from here, inside their functions, so
`recflow --help` and the data stages never pay for importing TensorFlow.
"""

import contextlib
import os


@contextlib.contextmanager
def _native_stderr_silenced():
    """TensorFlow's native code writes start-up lines straight to file descriptor 2 before
    its log level applies ("Could not find cuda drivers", "All log messages before
    absl::InitializeLog()..."): noise on a machine without a GPU. Python errors raised
    meanwhile still reach the caller and print as usual."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


os.environ["TF_USE_LEGACY_KERAS"] = "1"
# TensorFlow's own pooling allocator on CPU (BFC, as on GPUs) instead of malloc: a tensor
# larger than malloc's 32 MB mmap threshold (the l2 gradient of a 150,000-item id table is 77
# MB) was mapped and zeroed anew every step. At 150,000 items a retrieval training step took
# 65 ms instead of 171 (docs/performance.md, "Where the time and memory go").
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
# 3: native errors too (a CPU-only machine logs a failed cuInit as an error); Python-side
# warnings that matter still show through the `tensorflow` logger at ERROR.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

with _native_stderr_silenced():
    import tensorflow as tf  # noqa: E402

    tf.config.list_physical_devices("GPU")  # device discovery, where the CUDA lines come from
import tensorflow_recommenders as tfrs  # noqa: E402
import tf_keras as keras  # noqa: E402

tf.get_logger().setLevel("ERROR")


def seed_everything(seed: int) -> None:
    """Same input and seed give the same model: seeded initialisers, shuffles and ops."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


__all__ = ["keras", "seed_everything", "tf", "tfrs"]
