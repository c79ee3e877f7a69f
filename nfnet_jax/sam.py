"""Sharpness-Aware Minimisation gradient (Foret et al. 2021), with a partial ascent batch.

    g_a   = grad L(params; ascent rows)          (perturbation='global': pmean over devices)
    e     = rho * g_a / ||g_a||                  (global norm, float32)
    g_sam = grad L(params + e; whole local batch)

Taking the ascent gradient on a fraction of the batch (0.2 in the NFNet paper's large
models) cuts SAM's extra cost from one full backward pass to ``fraction`` of one.

The ascent rows are K = round(fraction * B) rows spread evenly over the *global*
batch of B rows, row floor(j * B / K) for j < K, so they span the whole batch (with
MixUp + CutMix, whose first half is MixUp, both kinds) and are the same rows on 1
or 256 devices. Each device takes the ones among its own rows.

Perturbation:
  'global'      the devices' ascent gradients are averaged before the norm: one
                perturbation, from the gradient of all K rows, whatever the device count.
  'per_device'  each device perturbs by the gradient of its own ascent rows (the
                default of SAM's reference code, "m-sharpness" with m = the rows per
                device); the result depends on how the batch is split over devices.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

__all__ = ['sam_gradient', 'ascent_size', 'ascent_rows', 'PERTURBATIONS']

PyTree = Any
LossFn = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, Any]]
PERTURBATIONS = ('global', 'per_device')


def ascent_size(batch_size: int, fraction: float) -> int:
  """Number of examples of a batch of `batch_size` used for the ascent: round(f*B), in [1, B]."""
  return min(batch_size, max(1, int(round(fraction * batch_size))))


def ascent_rows(local_size: int, fraction: float, num_shards: int = 1,
                shard_index: Any = 0) -> tuple[jax.Array, jax.Array]:
  """This shard's ascent rows: (local row indices [M] int32, valid [M] float32).

  The global batch is `num_shards` shards of `local_size` rows, shard d holding global
  rows [d * local_size, (d + 1) * local_size). Of the K = ascent_size(global, fraction)
  global ascent rows floor(j * global / K), shard d holds those with j in
  [ceil(d K / n), ceil((d + 1) K / n)): at most M = ceil(K / n) of them. Slots past
  its count point at its row 0 with valid 0. `shard_index` may be traced.
  """
  n, b = num_shards, local_size
  total = n * b
  k = ascent_size(total, fraction)
  m = -(-k // n)
  d = jnp.asarray(shard_index, jnp.int32)
  first = (d * k + n - 1) // n          # ceil(d K / n)
  stop = ((d + 1) * k + n - 1) // n     # ceil((d + 1) K / n)
  j = first + jnp.arange(m, dtype=jnp.int32)
  valid = j < stop
  rows = (j * total) // k - d * b
  rows = jnp.where(valid, rows, 0)
  return rows, valid.astype(jnp.float32)


def _axis_size(axis_name: str) -> int:
  if hasattr(jax.lax, 'axis_size'):
    return int(jax.lax.axis_size(axis_name))
  return int(jax.lax.psum(1, axis_name))


def sam_gradient(loss_fn: LossFn,
                 params: PyTree,
                 batch: PyTree,
                 rng: jax.Array,
                 *,
                 rho: float = 0.05,
                 fraction: float = 1.0,
                 axis_name: Optional[str] = None,
                 perturbation: str = 'global',
                 mask_key: str = 'mask',
                 ) -> tuple[PyTree, tuple[jax.Array, Any]]:
  """The SAM descent gradient for one (per-device) step.

  Args:
    loss_fn: ``loss_fn(params, batch, rng) -> (scalar loss, aux)``.
    params: parameter tree (replicated across ``axis_name`` if given).
    batch: tree of arrays with a leading local batch dim B. When the ascent rows do
      not split evenly over the devices (K not a multiple of the device count), it
      must be a mapping with a per-example weight ``batch[mask_key]`` [B] that the
      loss honours: the padding rows get weight 0.
    rng: PRNG key passed to both passes (same dropout / stochastic-depth stream).
    rho: perturbation radius; ``rho = 0`` gives the plain gradient.
    fraction: share of the *global* batch used for the ascent gradient, rows spread
      evenly over it (see `ascent_rows`); 1.0 is plain SAM.
    axis_name: data-parallel axis (None: one device).
    perturbation: 'global' (the ascent gradient is ``pmean``-ed over ``axis_name``
      before its norm is taken, so every device applies the same perturbation) or
      'per_device' (each device's own; needs ``shard_map(check_vma=False)`` or pmap,
      where ``jax.grad`` stays per device). Under ``shard_map(check_vma=True)``
      ``jax.grad`` already sums a replicated parameter's gradient over the axis, the
      ``pmean`` is a no-op and the perturbation is global either way.
  Returns:
    ``(grads, (loss, aux))``: the descent gradient on the whole local batch at
    ``params + e``, and ``loss_fn``'s outputs **at the perturbed point** (they come
    free with the descent pass). ``grads`` is exactly what ``jax.grad(loss_fn)``
    gives in your context, so reduce it as you would a plain gradient: per device
    under pmap / ``shard_map(check_vma=False)`` (``pmean`` it), already summed
    over the axis under ``shard_map``'s default ``check_vma=True`` (divide by the
    axis size).
  """
  if perturbation not in PERTURBATIONS:
    raise ValueError(f'sam_gradient: perturbation={perturbation!r}, one of {PERTURBATIONS}')
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError('sam_gradient: batch has no arrays')
  local = leaves[0].shape[0]
  n = _axis_size(axis_name) if axis_name is not None else 1
  d = jax.lax.axis_index(axis_name) if axis_name is not None else 0
  if fraction >= 1.0:
    sub = batch
  else:
    rows, valid = ascent_rows(local, fraction, n, d)
    sub = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), batch)
    if ascent_size(n * local, fraction) % n:
      if not (isinstance(sub, Mapping) and mask_key in sub):
        raise ValueError(
            f'sam_gradient: {ascent_size(n * local, fraction)} ascent rows do not split '
            f'evenly over {n} devices; the batch needs a per-example weight '
            f'batch[{mask_key!r}] for the padding rows')
      sub = dict(sub)
      sub[mask_key] = sub[mask_key] * valid.astype(sub[mask_key].dtype)

  g_asc = jax.grad(lambda p: loss_fn(p, sub, rng)[0])(params)
  if axis_name is not None and perturbation == 'global':
    g_asc = jax.lax.pmean(g_asc, axis_name)
  sq = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(g_asc))
  scale = rho / (jnp.sqrt(sq) + 1e-12)
  perturbed = jax.tree.map(
      lambda p, g: (p.astype(jnp.float32) + scale * g.astype(jnp.float32)).astype(p.dtype),
      params, g_asc)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(perturbed, batch, rng)
  return grads, (loss, aux)
