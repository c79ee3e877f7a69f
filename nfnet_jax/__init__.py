"""nfnet_jax: Normalizer-Free Networks in JAX/Haiku.

Import submodules directly (`nfnet_jax.models`, `nfnet_jax.agc`, `nfnet_jax.optim`,
`nfnet_jax.data`); this package file imports nothing heavy so that `nfnet_jax.agc`
stays free of Haiku and TensorFlow.
"""
__version__ = '0.1.0'
