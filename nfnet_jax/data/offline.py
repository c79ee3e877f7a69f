"""Former home of the shapes dataset and the numpy path, kept so that existing
imports work. New code imports `nfnet_jax.data.shapes` (the dataset),
`nfnet_jax.data.numpy_pipeline` (the TF-free input path) and
`nfnet_jax.data.normalize` (the normalisation constants)."""
from nfnet_jax.data.normalize import MEAN_RGB, STDDEV_RGB, normalize  # noqa: F401
from nfnet_jax.data.numpy_pipeline import cutmix_box, mix_pairs, one_hot  # noqa: F401
from nfnet_jax.data.numpy_pipeline import eval_iter as numpy_eval_iter  # noqa: F401
from nfnet_jax.data.numpy_pipeline import train_iter as numpy_train_iter  # noqa: F401
from nfnet_jax.data.shapes import (MAX_CLASSES, NUM_SHAPES, NUM_TEXTURES, SHAPES,  # noqa: F401
                                   TEXTURES, class_names, generate, load)

_mix_numpy = mix_pairs  # The numpy reference of the mixing used by tests.
