"""Adaptive gradient clipping (AGC), unit-wise, as an optax transform.

Brock, De, Smith, Simonyan (2021), "High-Performance Large-Scale Image Recognition
Without Normalization". For every *unit* u of a parameter W with gradient G (a column
of a linear ``(in, out)`` kernel, an output channel of an ``HWIO`` conv kernel, or the
whole of a vector or scalar)::

    max_u = clipping * max(||W||_u, eps)
    if ||G||_u > max_u:  G_u <- G_u * max_u / ||G||_u

Units (the reduction axes of the Frobenius norm), as in the paper's code:

=============================  =====================================
leaf                           reduced over
=============================  =====================================
squeezes to rank <= 1          all axes (the leaf is one unit)
rank 2 ``(in, out)``           axis 0
rank 3 (multi-head linear)     axis 0
rank 4 conv ``HWIO``           axes (0, 1, 2)
rank 5 conv ``DHWIO``          axes (0, 1, 2, 3)
=============================  =====================================

Anything else (e.g. a 1-D conv kernel ``(W, I, O)``, which the rank-3 rule would
treat as a multi-head linear) is set with ``unit_axes(path, leaf) -> axes | None``.

Choosing ``clipping``: the paper found that the best threshold shrinks as the batch
grows. It used ``clipping=0.01`` for batch 4096 (and larger), and found larger
thresholds (e.g. 0.04-0.16) fine, even better, at small batch sizes. AGC should not
be applied to the final classifier layer: :func:`nfnet_mask` for this project's
Haiku models, :func:`classifier_mask` (the classifier's path as each library names
it) for any tree. Equinox kernels put the output axis first: pass
``unit_axes=output_first_unit_axes``.

Data parallel: clip the device-averaged gradient (the params are replicated, so no
extra collective is needed). Beware that under ``jax.shard_map``'s default
``check_vma=True``, ``jax.grad`` of a replicated parameter is already the *sum* over
the data axis (a ``pmean`` of it is then a no-op): differentiate
``lax.pmean(loss, axis)`` instead, or use ``check_vma=False`` and ``pmean`` the
gradient as under ``pmap``. A wrong gradient scale changes what AGC clips.

This module imports only jax, optax and numpy, so it can be reused in any JAX project
(Flax, Equinox, Haiku, plain functions)::

    import optax
    from nfnet_jax.agc import agc
    tx = optax.chain(agc(0.01), optax.sgd(0.1, momentum=0.9, nesterov=True))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)   # params are required
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ['agc', 'clip_fraction', 'classifier_mask', 'nfnet_mask', 'output_first_unit_axes',
           'path_names', 'PathMask', 'unit_norms', 'default_unit_axes']

PyTree = Any
KeyPath = tuple[Any, ...]
Axes = Optional[tuple[int, ...]]
UnitAxesFn = Callable[[KeyPath, Any], Axes]
MaskArg = Union[None, PyTree, Callable[[PyTree], PyTree]]


def _is_float_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) and jnp.issubdtype(
      x.dtype, jnp.floating)


def default_unit_axes(x: Any) -> Axes:
  """Reduction axes of the unit-wise norm of ``x``; ``None`` means all axes."""
  shape = tuple(np.shape(x))
  if sum(d != 1 for d in shape) <= 1:  # squeezes to a scalar or a vector
    return None
  if len(shape) in (2, 3):
    return (0,)
  if len(shape) == 4:
    return (0, 1, 2)
  if len(shape) == 5:
    return (0, 1, 2, 3)
  raise ValueError(
      f'agc: no default unit axes for a rank-{len(shape)} leaf of shape {shape}; '
      'pass unit_axes=lambda path, leaf: <axes to reduce> for it.')


def unit_norms(x: jax.Array, axes: Axes = None) -> jax.Array:
  """Float32 L2 norm of each unit of ``x``, kept broadcastable to ``x.shape``.

  Args:
    x: array of any rank.
    axes: axes reduced; ``None`` reduces all of them (one unit).
  Returns:
    float32 array of rank ``x.ndim`` with size 1 on the reduced axes.
  """
  x32 = jnp.asarray(x).astype(jnp.float32)
  return jnp.sqrt(jnp.sum(x32 * x32, axis=axes, keepdims=True))


def _leaf_norms(g, p, clipping, eps, axes):
  """(||G||_u, clipping * max(||W||_u, eps)), both float32, keepdims."""
  if np.shape(g) != np.shape(p):
    raise ValueError(f'agc: gradient shape {np.shape(g)} != param shape {np.shape(p)}')
  return unit_norms(g, axes), clipping * jnp.maximum(unit_norms(p, axes), eps)


def _broadcast_mask(mask: MaskArg, updates: PyTree, params: PyTree) -> PyTree:
  """A bool leaf for every leaf (``None`` included) of ``updates``."""
  is_none = lambda x: x is None
  if mask is None:
    return jax.tree.map(lambda _: True, updates, is_leaf=is_none)
  m = mask(params) if callable(mask) else mask
  # `m` may be a prefix of the tree: spread each bool over its subtree.
  return jax.tree.map(
      lambda b, sub: jax.tree.map(lambda _: bool(b), sub, is_leaf=is_none),
      m, updates, is_leaf=is_none)


def _apply(fn, updates, params, mask, unit_axes, skip):
  """Maps ``fn(g, p, axes)`` over the array leaves selected by ``mask``.

  Leaves that are ``None``, not floating arrays, or masked out get ``skip(g)``.
  """
  if params is None:
    raise ValueError(
        'agc needs the current parameters: call tx.update(grads, state, params) '
        '(AGC clips each unit of the gradient relative to its parameter norm).')
  full_mask = _broadcast_mask(mask, updates, params)

  def leaf(path, g, m, p):
    if not m or not _is_float_array(g) or not hasattr(p, 'shape'):
      return skip(g)
    axes = unit_axes(path, g) if unit_axes is not None else None
    if axes is None:
      axes = default_unit_axes(g)
    elif isinstance(axes, int):
      axes = (axes,)
    return fn(g, p, None if axes is None else tuple(axes))

  return jax.tree_util.tree_map_with_path(
      leaf, updates, full_mask, params, is_leaf=lambda x: x is None)


def agc(clipping: float = 0.01,
        eps: float = 1e-3,
        *,
        unit_axes: Optional[UnitAxesFn] = None,
        mask: MaskArg = None) -> optax.GradientTransformation:
  """Unit-wise adaptive gradient clipping.

  Args:
    clipping: ``lambda``, the largest allowed ratio ||G||_u / max(||W||_u, eps).
      Smaller for larger batches (0.01 at batch 4096 in the paper).
    eps: floor on the parameter norm, so zero-initialised parameters (biases,
      skip gains) can still move, and zero gradients give no NaN.
    unit_axes: optional ``f(path, leaf) -> axes or None`` overriding the reduction
      axes per leaf (``path`` is a ``jax.tree_util`` key path, see
      ``jax.tree_util.keystr``); ``None`` falls back to the default rule.
    mask: which leaves to clip: a bool pytree (or prefix of one) matching the
      params, or a callable ``params -> bool pytree``. ``False`` leaves pass
      through unchanged. ``None`` clips every floating leaf.
  Returns:
    An ``optax.GradientTransformation`` with empty state; ``update`` requires
    ``params``. Norms are computed in float32; each update keeps its own dtype.
    ``None`` and non-floating leaves (ints, functions, ...) pass through.
  """

  def clip(g, p, axes):
    g_norm, max_norm = _leaf_norms(g, p, clipping, eps, axes)
    clipped = g_norm > max_norm
    # Unclipped units get scale exactly 1, so they come back bit-identical.
    scale = jnp.where(clipped, max_norm / jnp.where(clipped, g_norm, 1.0), 1.0)
    return (g.astype(jnp.float32) * scale).astype(g.dtype)

  def update_fn(updates, state, params=None):
    return _apply(clip, updates, params, mask, unit_axes, lambda g: g), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def clip_fraction(grads: PyTree,
                  params: PyTree,
                  clipping: float = 0.01,
                  eps: float = 1e-3,
                  *,
                  unit_axes: Optional[UnitAxesFn] = None,
                  mask: MaskArg = None) -> PyTree:
  """Per leaf, the fraction of units that :func:`agc` would clip.

  Same arguments as :func:`agc` plus the gradients and parameters. Costs two
  unit-norm reductions per leaf (no gradient rescaling), so it can be logged every
  N steps inside the jitted step, e.g.
  ``{jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(f)}``.

  Returns:
    A tree like ``grads`` whose leaves are float32 scalars in [0, 1]; masked,
    ``None`` and non-floating leaves become ``None``.
  """

  def frac(g, p, axes):
    g_norm, max_norm = _leaf_norms(g, p, clipping, eps, axes)
    return jnp.mean((g_norm > max_norm).astype(jnp.float32))

  return _apply(frac, grads, params, mask, unit_axes, lambda g: None)


def path_names(path: KeyPath) -> tuple[str, ...]:
  """The names along a ``jax.tree_util`` key path, as strings.

  ``DictKey`` gives its key, ``GetAttrKey`` its attribute name, ``SequenceKey`` its
  index and ``FlattenedIndexKey`` its index, so a Haiku path reads
  ``('NFNet/~/linear', 'w')``, a Flax linen one ``('params', 'Dense_1', 'kernel')``,
  an Equinox one ``('layers', '1', 'weight')`` and a Flax nnx one
  ``('head', 'kernel', 'value')`` (nnx Variables flatten to their ``.value``).
  """
  names = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      names.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      names.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      names.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      names.append(str(k.key))
    else:  # a custom key type: its own string form
      names.append(str(k))
  return tuple(names)


def _name_variants(path: KeyPath) -> list[tuple[str, ...]]:
  """``path_names(path)``, and without a trailing ``.value`` attribute.

  A Flax nnx ``Param`` flattens to ``GetAttrKey('value')``: its leaf is known by its
  module's names (``head/kernel``), so both forms are tried. Only an attribute key is
  dropped; a dict key named ``'value'`` is a name a user chose.
  """
  names = path_names(path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == 'value':
    return [names[:-1], names]
  return [names]


def _components(names: Sequence[str]) -> tuple[str, ...]:
  """Names split at '/', so Haiku's ``'NFNet/~/linear'`` compares part by part."""
  return tuple(part for name in names for part in name.split('/'))


class PathMask:
  """An AGC mask (``params -> bool tree``) that leaves matching leaves unclipped.

  A leaf matches when its path *ends with* one of ``paths`` (``'/'``-separated names
  as :func:`path_names` spells them, compared whole name by whole name) or when
  ``where(names)`` is true for its names. Leaves that match get ``False`` (not
  clipped); every other leaf gets ``True``. A mask that matches no leaf of the params
  it is given warns once (per mask object), since AGC would then clip every leaf,
  the classifier included.

  Args:
    paths: leaf paths, e.g. ``'NFNet/~/linear/w'`` (Haiku), ``'Dense_1/kernel'``
      (Flax linen), ``'head/kernel'`` (Flax nnx), ``'layers/1/weight'`` (Equinox).
    where: optional predicate on a leaf's names (a tuple of str); for an nnx
      Variable it sees the names without the trailing ``'value'`` first, then with it.
    label: how warnings name this mask.
  """

  def __init__(self, *paths: str, where: Optional[Callable[[tuple[str, ...]], bool]] = None,
               label: Optional[str] = None):
    for path in paths:
      if not isinstance(path, str) or not path.strip('/'):
        raise ValueError(f'agc mask: a path is a non-empty "/"-separated string, got {path!r}')
    if not paths and where is None:
      raise ValueError('agc mask: give the classifier\'s path (e.g. "head/kernel") or where=')
    self.paths = tuple(paths)
    self._suffixes = [_components(p.strip('/').split('/')) for p in paths]
    self.where = where
    args = [repr(p) for p in paths] + (['where=...'] if where is not None else [])
    self.label = label or f'classifier_mask({", ".join(args)})'
    self._warned = False

  def matches(self, path: KeyPath) -> bool:
    """Whether the leaf at ``path`` (a ``jax.tree_util`` key path) is left unclipped."""
    for names in _name_variants(path):
      parts = _components(names)
      if any(len(s) <= len(parts) and parts[len(parts) - len(s):] == s
             for s in self._suffixes):
        return True
      if self.where is not None and self.where(names):
        return True
    return False

  def __call__(self, params: PyTree) -> PyTree:
    hits = []

    def keep(path, _):
      hit = self.matches(path)
      hits.append(hit)
      return not hit

    mask = jax.tree_util.tree_map_with_path(keep, params)
    if hits and not any(hits) and not self._warned:
      self._warned = True
      last = ['/'.join(path_names(p)) for p, _ in
              jax.tree_util.tree_leaves_with_path(params)[-2:]]
      warnings.warn(
          f'{self.label} matches no leaf of the params, so AGC clips every leaf (the '
          f'classifier too); leaf paths here look like {", ".join(last)}: give the '
          "classifier weight's path to nfnet_jax.agc.classifier_mask",
          stacklevel=2)
    return mask

  def __repr__(self) -> str:
    return self.label


def classifier_mask(*paths: str,
                    where: Optional[Callable[[tuple[str, ...]], bool]] = None) -> PathMask:
  """The AGC mask that leaves the classifier weight unclipped, for any library.

  Name the classifier weight by the end of its path, as the library names it::

    classifier_mask('NFNet/~/linear/w')   # Haiku: {'NFNet/~/linear': {'w': ...}}
    classifier_mask('Dense_1/kernel')     # Flax linen: {'params': {'Dense_1': ...}}
    classifier_mask('head/kernel')        # Flax nnx: nnx.split(model, nnx.Param)
    classifier_mask('layers/1/weight')    # Equinox: eqx.nn.MLP's last Linear

  or with a predicate on the leaf's names, e.g.
  ``where=lambda names: names[-2:] == ('head', 'kernel')``. See :class:`PathMask`;
  ``jax.tree_util.tree_leaves_with_path(params)`` and :func:`path_names` list the
  names of a tree. A mask that matches nothing warns once.
  """
  return PathMask(*paths, where=where)


def output_first_unit_axes(path: KeyPath, leaf: Any) -> Axes:
  """``unit_axes`` for kernels whose *first* axis is the output, as in Equinox.

  Equinox stores ``Linear.weight`` as ``(out, in)`` and ``Conv2d.weight`` as
  ``(out, in, kh, kw)``; each output row / channel is a unit, so every axis but the
  first is reduced. Leaves that squeeze to rank <= 1 stay one unit (``None``).
  """
  del path
  shape = tuple(np.shape(leaf))
  if sum(d != 1 for d in shape) <= 1:
    return None
  return tuple(range(1, len(shape)))


def _is_nfnet_classifier(names: tuple[str, ...],
                         classifier_names: Optional[tuple[str, ...]],
                         weight_names: tuple[str, ...]) -> bool:
  if len(names) < 2 or names[-1] not in weight_names:
    return False
  parent = names[-2]
  if classifier_names is not None:
    return parent in classifier_names
  parts = parent.split('/~/')  # directly under a Haiku model root: 'NFNet/~/linear'
  return len(parts) == 2 and parts[1] == 'linear'


# One mask object per argument set and tree structure: each warns once however often
# a step is traced, and a different model gets its own warning.
_NFNET_MASKS: dict[tuple[Any, Any, Any], PathMask] = {}


def nfnet_mask(params: PyTree,
               classifier_names: Optional[Sequence[str]] = None,
               weight_names: Sequence[str] = ('w', 'kernel')) -> PyTree:
  """The NFNet AGC mask: ``False`` for the final classifier weight only.

  Default rule (Haiku trees ``{module_path: {leaf: array}}``): the classifier is the
  module whose path has exactly one ``/~/`` and ends in ``linear``, i.e. it sits
  directly under the model root (``NFNet/~/linear``, ``NF_ResNet/~/linear``); the
  squeeze-excite linears (``NFNet/~/nf_block/~/squeeze_excite/~/linear``) and the
  classifier bias stay clipped. For other libraries and names use
  :func:`classifier_mask`. Warns when no leaf matches (AGC would then clip the
  classifier too), e.g. on a Flax tree: once per argument set and tree structure.

  Args:
    params: the parameter tree.
    classifier_names: if given, the classifier is instead any parent key (module
      name) in this list, e.g. ``('head',)`` for Flax ``{'head': {'kernel': ..}}``
      or ``('NFNet/~/linear',)``.
    weight_names: leaf names of the classifier weight.
  Returns:
    A bool tree with the structure of ``params``.
  """
  names = None if classifier_names is None else tuple(classifier_names)
  weights = tuple(weight_names)
  key = (names, weights, jax.tree.structure(params))
  mask = _NFNET_MASKS.get(key)
  if mask is None:
    label = 'nfnet_mask' if names is None else f'nfnet_mask(classifier_names={names!r})'
    mask = PathMask(where=lambda n: _is_nfnet_classifier(n, names, weights), label=label)
    _NFNET_MASKS[key] = mask
  return mask(params)
