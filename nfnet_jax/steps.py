"""The compiled steps of training and evaluation, over a 1-D mesh of all devices.

Each step is written per device, pmap style: it sees its local batch and `lax.psum`s
gradients and metrics over the data axis `AXIS`. `Trainer` runs it as
`jax.jit(jax.shard_map(...))` over a mesh of every device of every host; that is what
`jax.pmap` itself is built on in current JAX. Randomness (dropout, stochastic depth)
is a function of (seed, step, global example index), so results do not depend on the
device or host count.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax

from nfnet_jax import cpu_workarounds, layers, optim, sam
from nfnet_jax import agc as agc_lib
from nfnet_jax.data import augment

AXIS = 'data'
Batch = dict[str, np.ndarray]


# ---------------------------------------------------------------------------
# Models with state (BatchNorm statistics). A stateless model runs through the same
# code as hk.with_empty_state(model); only a stateful one adds `model_state` and
# `ema_model_state` to the training state, so NF checkpoints keep their layout.
# ---------------------------------------------------------------------------
def with_state(model: hk.Transformed | hk.TransformedWithState
               ) -> tuple[hk.TransformedWithState, bool]:
  """(the model as init/apply with state, whether it has state of its own): what
  `models.create` returns, hk.transform or hk.transform_with_state of a model."""
  if isinstance(model, hk.TransformedWithState):
    return model, True
  if isinstance(model, hk.Transformed):
    return hk.with_empty_state(model), False
  raise TypeError(f'a train or eval step needs an hk.Transformed or '
                  f'hk.TransformedWithState model (models.create), got {type(model)}')


def model_variables(state, ema: bool = False) -> tuple[Any, Any]:
  """(params, model state) of a training state; ema=True: their EMAs."""
  if ema:
    return state['ema_params'], state.get('ema_model_state', {})
  return state['params'], state.get('model_state', {})


def make_init_fn(config, model, tx, image_size: int) -> Callable:
  """params (or None: fresh init) -> the training state.

  State: params, opt_state, ema_params (float32), step, nonfinite (consecutive
  non-finite steps), skipped (all of them), rng; for a model with state (BatchNorm)
  also model_state and its EMA ema_model_state (the model's own initial state also
  when `params` are given).
  """
  model, stateful = with_state(model)

  def init(params=None):
    rng = jax.random.PRNGKey(config.seed)
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    init_params, model_state = model.init(jax.random.fold_in(rng, 1), dummy,
                                          is_training=True)
    params = init_params if params is None else params
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    out = dict(params=params, opt_state=tx.init(params),
               ema_params=jax.tree.map(lambda x: x, params),
               step=jnp.zeros((), jnp.int32), nonfinite=jnp.zeros((), jnp.int32),
               skipped=jnp.zeros((), jnp.int32), rng=rng)
    if stateful:
      out.update(model_state=model_state,
                 ema_model_state=jax.tree.map(lambda x: x, model_state))
    return out
  return init


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """[B] 1.0 where the (hard) label is among the top-k logits [B, C], else 0.0.

  The label's rank counts the logits strictly above its own plus the *other* logits
  equal to it: a tie is broken against the label, so a constant row (a dead network)
  is never correct, and neither is a label tied for the k-th place. Compared in
  float32 whatever the eval dtype (bfloat16 logits are widened exactly; near-ties
  that bfloat16 rounded together stay ties, and count against the label). A row with
  any non-finite logit scores 0: NaN compares false with everything, so without that
  rule an all-NaN row would rank its label first.
  """
  logits = logits.astype(jnp.float32)
  target = jnp.argmax(labels, axis=-1)
  target_logit = jnp.take_along_axis(logits, target[:, None], axis=-1)
  others = jnp.arange(logits.shape[-1]) != target[:, None]
  rank = jnp.sum(logits > target_logit, axis=-1) + jnp.sum(
      (logits == target_logit) & others, axis=-1)
  finite = jnp.all(jnp.isfinite(logits), axis=-1)
  return ((rank < k) & finite).astype(jnp.float32)


# ---------------------------------------------------------------------------
# The train step, in pieces: loss, gradients (plain, accumulated over micro-batches,
# or SAM's), the reduction over devices, the state update, the metrics.
# ---------------------------------------------------------------------------
def make_loss_fn(config, model: hk.TransformedWithState) -> Callable:
  """(params, model state, local batch, rng, offset) -> (sum of the local examples'
  losses / the *global* batch size, ((loss sum, top-1 count), new model state)).

  `offset` is the global index of the batch's row 0 (per-example randomness follows
  it); images [b, S, S, 3] are cast to config.compute_dtype, labels [b, K] are soft,
  mask [b] weighs each row (0: padding)."""
  global_batch = config.batch_size
  cdt = jnp.bfloat16 if config.compute_dtype == 'bfloat16' else jnp.float32
  ls = config.label_smoothing

  def loss_fn(params, model_state, batch, rng, offset):
    with layers.example_offset(offset):
      out, model_state = model.apply(params, model_state, rng,
                                     batch['images'].astype(cdt), True)
    logits = out['logits']
    per_example = optim.softmax_cross_entropy(logits, batch['labels'], ls)
    mask = batch['mask']
    loss_sum = jnp.sum(per_example * mask)
    top1 = jnp.sum(top_k_correct(logits, batch['labels'], 1) * mask)
    return loss_sum / global_batch, ((loss_sum, top1), model_state)

  return loss_fn


def accumulated_gradients(grad_fn: Callable, params, model_state, batch, rng, offset,
                          accum: int):
  """`grad_fn` (jax.grad of a loss_fn, with aux) summed over `accum` micro-batches of
  the local batch, in order, the model state threaded through them; returns (grads,
  (loss sum, top-1 count), new model state). Micro-batch i holds this device's rows
  [i * micro, (i + 1) * micro), so every row keeps its global index."""
  if accum == 1:
    grads, (aux, model_state) = grad_fn(params, model_state, batch, rng, offset)
    return grads, aux, model_state
  micro = batch['images'].shape[0] // accum
  split = jax.tree.map(lambda x: x.reshape((accum, micro) + x.shape[1:]), batch)

  def body(carry, xs):
    i, mb = xs
    acc_g, acc_aux, ms = carry
    g, (aux, ms) = grad_fn(params, ms, mb, rng, offset + i * micro)
    return (jax.tree.map(jnp.add, acc_g, g), jax.tree.map(jnp.add, acc_aux, aux),
            ms), None

  zeros = (jax.tree.map(jnp.zeros_like, params), (jnp.zeros(()), jnp.zeros(())),
           model_state)
  (grads, aux, model_state), _ = jax.lax.scan(
      body, zeros, (jnp.arange(accum), split), unroll=cpu_workarounds.unroll_loops())
  return grads, aux, model_state


def sam_gradients(loss_fn: Callable, params, model_state, batch, rng, offset,
                  sam_config):
  """SAM's gradient (sam.sam_gradient) of `loss_fn` on the local batch; returns
  (grads, (loss sum, top-1 count), model state). Stateless models only
  (configs.validate_config).

  The ascent rows are strided over the batch: each row carries its global example
  index, so its dropout / stochastic-depth draws are the ones it gets in the descent
  pass, on any device count. (A zero-weight padding row may get a clipped index; it
  does not count.)"""
  local = batch['images'].shape[0]
  ids = offset + jnp.arange(local, dtype=jnp.int32)

  def indexed_loss(p, b, r):
    b = dict(b)
    idx = b.pop('example_index')
    return loss_fn(p, model_state, b, r, jnp.maximum(idx - jnp.arange(idx.shape[0]), 0))

  grads, (_, (aux, _)) = sam.sam_gradient(
      indexed_loss, params, dict(batch, example_index=ids), rng, rho=sam_config.rho,
      fraction=sam_config.fraction, axis_name=AXIS, perturbation=sam_config.perturbation)
  return grads, aux, model_state


def make_gradient_fn(config, loss_fn: Callable) -> Callable:
  """(params, model state, local batch, rng, offset) -> (local gradient of sum(local
  losses) / global batch, (loss sum, top-1 count), new model state): SAM's with
  config.sam.enabled, else summed over config.grad_accum_steps micro-batches."""
  if config.sam.enabled:
    return functools.partial(sam_gradients, loss_fn, sam_config=config.sam)
  return functools.partial(accumulated_gradients, jax.grad(loss_fn, has_aux=True),
                           accum=config.grad_accum_steps)


def update_state(config, tx: optax.GradientTransformation, state, grads, loss,
                 model_state, stateful: bool):
  """The optimizer step (AGC included: it sees the global batch's gradient), the EMAs
  and the non-finite guard; returns (new state, gradient norm, finite).

  A non-finite loss, gradient or new state skips the update: the state (and so every
  checkpoint) stays finite. (The EMA mixes finite params, so it is too.) A model with
  BatchNorm replaces its per-device moving averages by their mean over devices
  (their counters are equal), and the parameters' EMA covers them too."""
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  if stateful:
    model_state = jax.tree.map(
        lambda x: jax.lax.pmean(x, AXIS) if jnp.issubdtype(x.dtype, jnp.floating)
        else x, model_state)
  finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            & all_finite((params, opt_state, model_state)))
  # `finite` is a chain of a few hundred scalar ANDs (one per array), and XLA copies a
  # chain that cheap into each of the few hundred `keep` selects below that use it (one
  # fusion per array): on CPU that is most of the step's compile time. XLA never
  # copies an op it counts as expensive (sqrt), so passing the flag through one keeps
  # the chain in one place. sqrt(1) = 1 and sqrt(0) = 0: the flag is unchanged.
  finite = jnp.sqrt(finite.astype(jnp.float32)) > 0.5
  ema = optim.ema_update(state['ema_params'], params, state['step'] - state['skipped'],
                         config.ema_decay)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  nonfinite = jnp.where(finite, 0, state['nonfinite'] + 1)
  new_state = dict(
      params=keep(params, state['params']),
      opt_state=keep(opt_state, state['opt_state']),
      ema_params=keep(ema, state['ema_params']),
      step=state['step'] + 1,
      nonfinite=nonfinite,
      skipped=state['skipped'] + (~finite).astype(jnp.int32),
      rng=state['rng'])
  if stateful:
    ema_ms = optim.ema_update(state['ema_model_state'], model_state,
                              state['step'] - state['skipped'], config.ema_decay)
    new_state.update(model_state=keep(model_state, state['model_state']),
                     ema_model_state=keep(ema_ms, state['ema_model_state']))
  return new_state, grad_norm, finite


def step_metrics(config, schedule: Callable, state, grads, loss, top1, count,
                 grad_norm, finite) -> dict[str, jax.Array]:
  """The step's scalars: loss and top-1 of the global batch, the gradient norm, the
  learning rate, whether the update was applied; with
  config.log_agc_clip_fraction, the mean fraction of AGC-clipped units."""
  metrics = dict(loss=loss, top1=top1 / jnp.maximum(count, 1.0), grad_norm=grad_norm,
                 lr=schedule(state['step'] - state['skipped']),
                 finite=finite.astype(jnp.float32))
  if config.log_agc_clip_fraction and config.optimizer.agc_clipping:
    fracs = agc_lib.clip_fraction(grads, state['params'], config.optimizer.agc_clipping,
                                  config.optimizer.agc_eps)
    metrics['agc_clip_fraction'] = jnp.mean(jnp.stack(
        [jnp.asarray(f, jnp.float32) for f in jax.tree.leaves(fracs)]))
  return metrics


def make_train_step(config, model, tx, schedule) -> Callable:
  """Per device: (state, local batch, host flags) -> (state, metrics, control).

  `model`: what `models.create` returns. A model with BatchNorm normalizes each
  micro-batch of each device with its own statistics (config.bn_cross_device: of all
  devices' micro-batches) and updates its moving averages once per micro-batch; the
  new moving averages are then averaged over devices (the mean of per-device
  statistics), so the state stays replicated.

  The local batch is the input pipeline's: {images [b, S, S, 3], labels [b, K],
  mask [b]}, or with data.augment_on='device' the uint8 batch of `augment`
  (every array's leading axis b).
  """
  model, stateful = with_state(model)
  gradients = make_gradient_fn(config, make_loss_fn(config, model))

  def step_fn(state, batch, flags_in):
    # data.augment_on='device': this device's rows arrive as uint8 inputs and are
    # mixed, RandAugmented and normalised here, each row with its own key (a host
    # batch is already augmented). The split into micro-batches comes after.
    if 'aug_row' in batch:
      batch = augment.augment(batch, augment.Recipe.from_config(config.data), config.seed)
    local = batch['images'].shape[0]
    offset = jax.lax.axis_index(AXIS) * local  # Global index of this device's row 0.
    rng = jax.random.fold_in(state['rng'], state['step'])
    grads, (loss_sum, top1), model_state = gradients(
        state['params'], state.get('model_state', {}), batch, rng, offset)
    # The whole update (AGC included) sees the gradient of the global batch.
    grads = jax.lax.psum(grads, AXIS)
    loss_sum, top1, count = jax.lax.psum(
        (loss_sum, top1, jnp.sum(batch['mask'])), AXIS)
    loss = loss_sum / jnp.maximum(count, 1.0)
    new_state, grad_norm, finite = update_state(config, tx, state, grads, loss,
                                                model_state, stateful)
    metrics = step_metrics(config, schedule, state, grads, loss, top1, count,
                           grad_norm, finite)
    control = dict(flags=jax.lax.psum(flags_in[0], AXIS),
                   nonfinite=new_state['nonfinite'], skipped=new_state['skipped'])
    return new_state, metrics, control

  return step_fn


def all_finite(tree) -> jax.Array:
  """Scalar bool: every float leaf of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_eval_step(config, model) -> Callable:
  """Per-device eval: sums of loss, top-1, top-5, count for raw and EMA variables,
  each `model_variables(state)`: (params, model state); BatchNorm normalizes with the
  moving averages of its state.

  Activations in config.eval_dtype (float32 by default, as the paper evaluates;
  config.compute_dtype is the training precision only).
  """
  model, _ = with_state(model)
  cdt = jnp.dtype(config.get('eval_dtype', 'float32'))

  def one(variables, batch):
    # (params, model state), or bare params for a model without state.
    params, model_state = variables if isinstance(variables, tuple) else (variables, {})
    logits = model.apply(params, model_state, None, batch['images'].astype(cdt),
                         False)[0]['logits']
    mask = batch['mask']
    loss = optim.softmax_cross_entropy(logits, batch['labels'], 0.0)
    return dict(loss=jnp.sum(loss * mask),
                top1=jnp.sum(top_k_correct(logits, batch['labels'], 1) * mask),
                top5=jnp.sum(top_k_correct(logits, batch['labels'], 5) * mask),
                count=jnp.sum(mask))

  def step_fn(params, ema_params, batch):
    sums = dict(raw=one(params, batch), ema=one(ema_params, batch))
    return jax.lax.psum(sums, AXIS)

  return step_fn


class Trainer:
  """Compiled steps over a mesh of all devices, plus host-side array assembly."""

  def __init__(self, config, model, tx, schedule, image_size: int):
    # Devices ordered by host, so host p's local batch is rows [p*local, (p+1)*local)
    # of the global batch, as the input pipeline numbers them.
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    self.mesh = Mesh(np.array(devices), (AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.data_sharding = NamedSharding(self.mesh, P(AXIS))
    shard = functools.partial(jax.shard_map, mesh=self.mesh, check_vma=False)
    self.train_step = jax.jit(
        shard(make_train_step(config, model, tx, schedule),
              in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(), P(), P())),
        donate_argnums=(0,))
    self.eval_step = jax.jit(
        shard(make_eval_step(config, model), in_specs=(P(), P(), P(AXIS)), out_specs=P()))
    init = make_init_fn(config, model, tx, image_size)
    self.abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated),
        jax.eval_shape(init))
    self._init = jax.jit(init, out_shardings=self.replicated,
                         compiler_options=cpu_workarounds.init_compiler_options())

  def init_state(self, params=None) -> dict[str, Any]:
    """Fresh state (replicated); `params`: host arrays to start from (fine-tuning)."""
    if params is not None:  # Same values on every host -> a replicated global array.
      params = jax.tree.map(lambda x: jax.make_array_from_callback(
          np.shape(x), self.replicated, lambda idx, x=x: np.asarray(x)[idx]), params)
    return self._init(params)

  def global_batch(self, local: Batch) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global arrays sharded over the data axis."""
    return {k: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(v))
            for k, v in local.items()}

  def host_flags(self, flags_: np.ndarray) -> jax.Array:
    """This host's flags [F] -> a global [devices, F] array (one row per device)."""
    local = np.tile(np.asarray(flags_, np.int32)[None], (jax.local_device_count(), 1))
    return jax.make_array_from_process_local_data(self.data_sharding, local)


def evaluate(trainer: Trainer, state, eval_iter: Iterator[Batch]) -> dict[str, float]:
  """Top-1, top-5, loss of raw and EMA params over the whole eval split."""
  totals = None
  for batch in eval_iter:
    sums = trainer.eval_step(model_variables(state), model_variables(state, ema=True),
                             trainer.global_batch(batch))
    sums = jax.device_get(sums)
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  if totals is None:
    raise ValueError('The eval split is empty')
  out = {}
  for which, t in totals.items():
    n = max(float(t['count']), 1.0)
    out.update({f'{which}_top1': float(t['top1']) / n, f'{which}_top5': float(t['top5']) / n,
                f'{which}_loss': float(t['loss']) / n})
  out['count'] = float(totals['raw']['count'])
  return out

