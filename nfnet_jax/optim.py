"""The NFNet training recipe: optimizer chain, schedule, loss and parameter EMA.

Recipe (Brock et al. 2021), built by :func:`build_optimizer` from a config::

    AGC (clipping 0.01, eps 1e-3, all leaves but the classifier weight)
    -> gradient += 2e-5 * param (not for gain, skip_gain, bias, b)
    -> SGD, Nesterov momentum 0.9, lr = 0.1 * batch / 256,
       linear warmup from 0 over 5 epochs, cosine decay to 0.

The SGD+Nesterov step is optax's (and the paper code's) form: with gradient ``g``
(after clipping and decay), ``m <- mu * m + g`` and ``param -= lr * (g + mu * m)``.

Step convention: optax evaluates the schedule with the number of updates already
done (0 at the first update), so the very first update uses lr = 0.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from nfnet_jax import errors
from nfnet_jax.agc import agc, nfnet_mask

__all__ = [
    'lr_schedule', 'decay_mask', 'add_weight_decay', 'default_config',
    'build_optimizer', 'softmax_cross_entropy', 'ema_decay', 'ema_update',
]

PyTree = Any
# Gains, biases and BatchNorm's scale/offset are not decayed (DeepMind's NFNet and
# BN-ResNet baselines exclude the same names).
NO_DECAY_NAMES: tuple[str, ...] = ('gain', 'skip_gain', 'bias', 'b', 'scale', 'offset')


def lr_schedule(base_lr: float,
                batch_size: int,
                total_steps: int,
                warmup_steps: int,
                end_lr: float = 0.0,
                scale_by_batch: bool = True) -> optax.Schedule:
  """Linear warmup from 0 then cosine decay to ``end_lr``.

  Peak ``base_lr * batch_size / 256`` (``base_lr`` if not ``scale_by_batch``) at
  ``step == warmup_steps``; ``end_lr`` at (and after) ``step == total_steps``.
  Returns a function of a scalar step giving a float32 scalar.
  """
  peak = base_lr * batch_size / 256.0 if scale_by_batch else base_lr
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup_steps, 1)
    t = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    cos = end_lr + (peak - end_lr) * 0.5 * (1.0 + jnp.cos(math.pi * t))
    return jnp.where(step < warmup_steps, warm, cos)

  return schedule


def _leaf_name(path) -> str:
  k = path[-1] if path else None
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def decay_mask(params: PyTree,
               exclude: Sequence[str] = NO_DECAY_NAMES) -> PyTree:
  """Bool tree: True where weight decay applies (leaf name not in ``exclude``)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _leaf_name(path) not in exclude, params)


def add_weight_decay(
    wd: float,
    mask_fn: Callable[[PyTree], PyTree] = decay_mask) -> optax.GradientTransformation:
  """``g <- g + wd * param`` on leaves where ``mask_fn(params)`` is True.

  The sum is computed in float32 and cast back to the gradient's dtype; ``None``
  and non-floating leaves pass through. ``update`` requires ``params``.
  """

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('add_weight_decay needs params: tx.update(g, state, params)')
    mask = mask_fn(params)

    def leaf(g, m, p):
      if g is None or not m or not jnp.issubdtype(jnp.result_type(g), jnp.floating):
        return g
      return (g.astype(jnp.float32) + wd * p.astype(jnp.float32)).astype(g.dtype)

    return jax.tree.map(leaf, updates, mask, params,
                        is_leaf=lambda x: x is None), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def default_config() -> ml_collections.ConfigDict:
  """Optimizer fields of the NFNet recipe (ImageNet, batch 4096)."""
  return ml_collections.ConfigDict(dict(
      name='sgd',               # 'sgd' | 'adamw' | 'adam'
      base_lr=0.1,              # per 256 examples when scale_lr_by_batch
      scale_lr_by_batch=True,
      end_lr=0.0,
      momentum=0.9,
      nesterov=True,
      weight_decay=2e-5,
      agc_clipping=0.01,        # 0 or None disables AGC
      agc_eps=1e-3,
  ))


def _get(cfg: Any, key: str, default: Any) -> Any:
  """``cfg[key]`` for a ConfigDict / mapping / object, ``default`` if missing."""
  if hasattr(cfg, 'get'):
    return cfg.get(key, default)
  return getattr(cfg, key, default)


OPTIMIZERS = ('sgd', 'adam', 'adamw')


def check_name(name: str) -> str:
  """The optimizer ``name`` in lower case; ValueError if it is not in OPTIMIZERS."""
  if str(name).lower() not in OPTIMIZERS:
    raise ValueError(errors.unknown_name('optimizer', name, OPTIMIZERS))
  return str(name).lower()


def build_optimizer(cfg: Any,
                    total_steps: int,
                    warmup_steps: int,
                    batch_size: int,
                    agc_mask: Optional[Callable[[PyTree], PyTree]] = nfnet_mask,
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer of :func:`default_config`-like ``cfg`` and its lr schedule.

  Chains (each part only if enabled):
    sgd:   agc(mask) -> add_weight_decay -> sgd(schedule, momentum, nesterov)
    adam:  agc(mask) -> add_weight_decay -> adam(schedule)
    adamw: agc(mask) -> adamw(schedule, weight_decay, decoupled, masked alike)

  Args:
    cfg: ConfigDict or mapping with the fields of :func:`default_config`
      (missing fields take their defaults).
    total_steps, warmup_steps: schedule lengths in optimizer steps.
    batch_size: global batch size (for the linear lr scaling).
    agc_mask: the AGC mask (default: all but the classifier weight).
  Returns:
    ``(transformation, schedule)``.
  """
  d = default_config()
  g = lambda k: _get(cfg, k, d[k])
  schedule = lr_schedule(g('base_lr'), batch_size, total_steps, warmup_steps,
                         g('end_lr'), g('scale_lr_by_batch'))
  parts = []
  clipping = g('agc_clipping')
  if clipping:
    parts.append(agc(clipping, g('agc_eps'), mask=agc_mask))
  name, wd = check_name(g('name')), g('weight_decay')
  if name in ('sgd', 'adam') and wd:
    parts.append(add_weight_decay(wd))
  if name == 'sgd':
    parts.append(optax.sgd(schedule, momentum=g('momentum') or None,
                           nesterov=g('nesterov')))
  elif name == 'adam':
    parts.append(optax.adam(schedule))
  else:
    parts.append(optax.adamw(schedule, weight_decay=wd or 0.0, mask=decay_mask))
  return optax.chain(*parts), schedule


def softmax_cross_entropy(logits: jax.Array,
                          labels: jax.Array,
                          label_smoothing: float = 0.1) -> jax.Array:
  """Label-smoothed cross-entropy, per example, in float32.

  Args:
    logits: [B, C], any float dtype.
    labels: [B, C] one-hot or soft (MixUp/CutMix) targets summing to 1, or
      integer class ids [B].
    label_smoothing: ``ls``; targets become ``labels * (1 - ls) + ls / C``.
  Returns:
    [B] float32 losses.
  """
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  if jnp.issubdtype(labels.dtype, jnp.integer) and labels.ndim == logits.ndim - 1:
    labels = jax.nn.one_hot(labels, num_classes)
  labels = labels.astype(jnp.float32)
  labels = labels * (1.0 - label_smoothing) + label_smoothing / num_classes
  return -jnp.sum(labels * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def ema_decay(step: Any, decay: float = 0.99999) -> jax.Array:
  """Warmed EMA decay ``min(decay, (1 + step) / (10 + step))`` (float32 scalar)."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema_params: PyTree,
               params: PyTree,
               step: Any,
               decay: float = 0.99999) -> PyTree:
  """One EMA step of the parameters (not of the updates, unlike ``optax.ema``).

  ``ema <- d * ema + (1 - d) * params`` with ``d = ema_decay(step, decay)``, where
  ``step`` is the number of optimizer updates done *before* the one that produced
  ``params`` (0 after the first update, as in the paper's code). Initialise
  ``ema_params`` as a float32 copy of the initial params. Float leaves come back as
  float32; other leaves take the value from ``params``.
  """
  d = ema_decay(step, decay)

  def leaf(e, p):
    if not jnp.issubdtype(jnp.result_type(p), jnp.floating):
      return p
    return d * jnp.asarray(e, jnp.float32) + (1.0 - d) * jnp.asarray(p, jnp.float32)

  return jax.tree.map(leaf, ema_params, params)
