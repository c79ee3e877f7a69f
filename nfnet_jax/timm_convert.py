"""Converting timm's NF-family weights into this package's params, without torch.

`from_timm(arrays, model)` takes timm's names and arrays (numpy arrays, e.g. read from
a `model.safetensors` with `safetensors.numpy.load_file`, or torch tensors) of any
model in `nfnet_jax.models.timm_models.TIMM_MODELS` (`dm_nfnet_f0`..`f6`,
`nfnet_l0`, `eca_nfnet_l0`..`l2`, `nf_regnet_b1`, `nf_resnet50`), maps the names to
DeepMind's module names (the table is in its docstring), transposes kernels and
linear weights, and renames the result to the registered model's own module names
(via `nfnet_jax.param_match`). `models.create(registry_name(name))` then
computes what timm computes; for the older form `from_timm(state_dict, 'F0')` run
the model with `TIMM_MODEL_OVERRIDES`.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import numpy as np

from nfnet_jax import errors, param_match
from nfnet_jax.models import nfnet, registry, timm_models
from nfnet_jax.models.timm_models import DM_NFNET_OPTIONS, TIMM_STD_CONV_EPS
from nfnet_jax.safe_pickle import Params

__all__ = ['from_timm', 'registry_name', 'TIMM_MODEL_OVERRIDES', 'TIMM_STD_CONV_EPS']

# Model options that make converted dm_nfnet_* weights compute what timm computes:
# `nfnet_jax.models.create('F0', **TIMM_MODEL_OVERRIDES)` (the registered
# `dm_nfnet_f0` has them built in).
TIMM_MODEL_OVERRIDES = dict(DM_NFNET_OPTIONS)


# ---------------------------------------------------------------------------
# timm conversion.
# ---------------------------------------------------------------------------
# DeepMind's module names of timm's modules (s = stage, b = block, i = global block).
_NFNET_STEM = {'conv1': 'stem_conv0', 'conv2': 'stem_conv1', 'conv3': 'stem_conv2',
               'conv4': 'stem_conv3'}
_BLOCK_CONVS = {'conv1': 'conv0', 'conv2': 'conv1', 'conv2b': 'conv1b', 'conv3': 'conv2',
                'downsample.conv': 'conv_shortcut'}
_SE = {'fc1': 'squeeze_excite/~/linear', 'fc2': 'squeeze_excite/~/linear_1'}
# family -> (DeepMind's top module, block module, timm's attention module: `attn`
# between the 3x3 and the last 1x1 (RegNet), `attn_last` after it (the others)).
_FAMILIES = {'NFNet': ('NFNet', 'nf_block', 'attn_last'),
             'NFRegNet': ('NF_RegNet', 'nf_block', 'attn'),
             'NFResNet': ('NF_ResNet', 'nf_res_block', 'attn_last')}
_KEY_RE = re.compile(
    r'^(?:stem\.(?P<stem>conv[1-4]?)\.(?P<stem_leaf>weight|bias|gain)'
    r'|stages\.(?P<s>\d+)\.(?P<b>\d+)\.(?:'
    r'(?P<conv>conv1|conv2|conv2b|conv3|downsample\.conv)\.(?P<conv_leaf>weight|bias|gain)'
    r'|(?P<attn>attn|attn_last)\.(?:(?P<se>fc1|fc2)\.(?P<se_leaf>weight|bias)'
    r'|(?P<eca>conv)\.weight)'
    r'|(?P<skip>skipinit_gain))'
    r'|final_conv\.(?P<final_leaf>weight|bias|gain)'
    r'|head\.fc\.(?P<fc_leaf>weight|bias))$')


def _to_numpy(value: Any) -> np.ndarray:
  """numpy array from a numpy array, a torch tensor (.detach().cpu().numpy()) or similar."""
  if isinstance(value, np.ndarray):
    return value
  for attr in ('detach', 'cpu'):
    if hasattr(value, attr):
      value = getattr(value, attr)()
  if hasattr(value, 'numpy') and not isinstance(value, np.generic):
    try:
      value = value.numpy()
    except TypeError:  # e.g. torch bfloat16 has no numpy dtype
      value = value.float().numpy()
  return np.asarray(value)


def _conv_leaf(leaf: str, a: np.ndarray, key: str) -> tuple[str, np.ndarray]:
  if leaf == 'weight':
    if a.ndim != 4:
      raise ValueError(f'timm {key}: expected an OIHW conv kernel, got shape {a.shape}')
    return 'w', a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if leaf == 'gain':
    if a.ndim != 4 or a.shape[1:] != (1, 1, 1):
      raise ValueError(f'timm {key}: expected a (O,1,1,1) gain, got shape {a.shape}')
    return 'gain', a.reshape(-1)
  return 'bias', a


def registry_name(model: str) -> str:
  """The registered model a timm name converts to: `eca_nfnet_l0` -> itself,
  `nf_resnet50` -> `timm/nf_resnet50` (timm_models.registry_name); a registry name of
  a timm model (`timm/nf_resnet50`) or an NFNet variant (`F0`, the older API) as is.
  Raises ValueError (one line, the valid names) for anything else."""
  if model in timm_models.TIMM_MODELS:
    return timm_models.registry_name(model)
  bare = model[len('timm/'):] if model.startswith('timm/') else None
  if (bare in timm_models.TIMM_MODELS and timm_models.registry_name(bare) == model
      or model in nfnet.VARIANTS):
    return model
  raise ValueError(errors.unknown_name('timm model', model, timm_models.TIMM_MODELS))


def from_timm(arrays: Mapping[str, Any], model: Optional[str] = None, *,
              variant: Optional[str] = None,
              overrides: Optional[Mapping[str, Any]] = None) -> Params:
  """Converts timm's weights of `model` into this package's params.

  `arrays` maps timm names to numpy arrays (or torch tensors / anything with
  `.numpy()`; bfloat16 and float16 are widened to float32); a leading `module.`
  (DataParallel) is stripped. `model` is a timm name (`eca_nfnet_l0`, `nf_resnet50`,
  ...: see `registry_name`) or, as before, an NFNet variant `F0`..`F6` for a
  `dm_nfnet_f*` state_dict (`variant=` is the older spelling; default `F0`). The
  result is in the module names of `models.create(registry_name(model), num_classes)`,
  num_classes read from `head.fc.weight`. Every key must be consumed and every
  parameter filled with the model's shape, else ValueError names the offenders.
  `overrides` are constructor options of the model the weights are for, when it is
  not the registered one (`depths`, `widths`, `group_size`, ...: small test models).

  The registered timm models carry the options that compute what timm computes
  (`timm_models`). A variant `F0`..`F6` needs `TIMM_MODEL_OVERRIDES` (exact erf GELU,
  WS epsilon 1e-5 added to the variance); DeepMind's defaults (tanh GELU,
  max(var * fan_in, 1e-4)) differ measurably (about 3% of the logit scale on random
  weights, against 1e-6 with the overrides).

  Name mapping (s = stage, b = block within the stage, i = sum(depths[:s]) + b, the
  global block index; block 0 is `<block>`, block i > 0 `<block>_{i}`, where `<block>`
  is `nf_block` (NFNet, NF-RegNet) or `nf_res_block` (NF-ResNet); names below are
  DeepMind's under `<Top>/~/` (`NFNet`, `NF_RegNet`, `NF_ResNet`), renamed to the
  model's on output):

  | timm key                               | ours                                | transform |
  |----------------------------------------|-------------------------------------|-----------|
  | stem.conv1 .. conv4.{weight,bias,gain} | stem_conv0 .. stem_conv3 (NFNet)    | conv      |
  | stem.conv.* (NF-RegNet, NF-ResNet)     | initial_conv                        | conv      |
  | stages.s.b.conv1.*                     | <block>_i/~/conv0                   | conv      |
  | stages.s.b.conv2.*                     | <block>_i/~/conv1                   | conv      |
  | stages.s.b.conv2b.* (NFNet)            | <block>_i/~/conv1b                  | conv      |
  | stages.s.b.conv3.*                     | <block>_i/~/conv2                   | conv      |
  | stages.s.b.downsample.conv.*           | <block>_i/~/conv_shortcut           | conv      |
  | stages.s.b.attn_last.fc1.{weight,bias} | <block>_i/~/squeeze_excite/~/linear {w,b}   | SE |
  | stages.s.b.attn_last.fc2.{weight,bias} | <block>_i/~/squeeze_excite/~/linear_1 {w,b} | SE |
  | stages.s.b.attn.fc{1,2}.* (NF-RegNet)  | the same                            | SE        |
  | stages.s.b.attn_last.conv.weight (ECA) | <block>_i/~/eca {w}                 | (1,1,k) -> (k,) |
  | stages.s.b.skipinit_gain (dm_nfnet)    | <block>_i (skip_gain)               | () as is  |
  | final_conv.{weight,bias,gain}          | final_conv {w,bias,gain}            | conv      |
  | head.fc.{weight,bias}                  | linear {w,b}                        | fc        |

  conv: weight (O, I/groups, kh, kw) -> w (kh, kw, I/groups, O); gain (O,1,1,1) -> (O,);
  bias (O,) as is. SE (1x1 nn.Conv2d in timm): weight (O, I, 1, 1) -> w (I, O); bias -> b.
  fc: weight (out, in) -> w (in, out); bias -> b.
  Parameter-free timm modules (activations, downsample.pool, stem.pool, attn gates,
  head.global_pool, drop_path) have no keys.
  """
  if model is not None and variant is not None and model != variant:
    raise ValueError(f'from_timm: model={model!r} and variant={variant!r} disagree')
  name = registry_name(model or variant or 'F0')
  facts = registry.info(name)
  top, block_name, attn_module = _FAMILIES[facts['family']]
  is_nfnet = facts['family'] == 'NFNet'
  overrides = dict(overrides or {})
  depths = list(overrides.get('depths') or facts['depth'])
  starts = np.cumsum([0] + depths)
  label = facts.get('timm_name', f'dm_nfnet_{name.lower()}')

  def block(s: int, b: int, key: str) -> str:
    if s >= len(depths) or b >= depths[s]:
      raise ValueError(f'timm {key}: stage {s} block {b} does not exist in {label} '
                       f'(depths {depths})')
    i = int(starts[s]) + b
    return f'{top}/~/' + (block_name if i == 0 else f'{block_name}_{i}')

  params: Params = {}
  unknown = []
  for key, value in arrays.items():
    key_name = key[len('module.'):] if key.startswith('module.') else key
    m = _KEY_RE.match(key_name)
    g = m.groupdict() if m else {}
    # Keys of another family's layout (stem.conv vs stem.conv1..4, conv2b, the
    # attention module's place) are not this model's.
    if (m is None or (g['stem'] is not None and (g['stem'] != 'conv') != is_nfnet)
        or (g['conv'] == 'conv2b' and not is_nfnet)
        or (g['attn'] is not None and g['attn'] != attn_module)):
      unknown.append(key)
      continue
    a = _to_numpy(value).astype(np.float32, copy=False)
    if g['stem']:
      module = f'{top}/~/' + (_NFNET_STEM[g['stem']] if is_nfnet else 'initial_conv')
      leaf, a = _conv_leaf(g['stem_leaf'], a, key)
    elif g['conv']:
      module = block(int(g['s']), int(g['b']), key) + '/~/' + _BLOCK_CONVS[g['conv']]
      leaf, a = _conv_leaf(g['conv_leaf'], a, key)
    elif g['se']:
      module = block(int(g['s']), int(g['b']), key) + '/~/' + _SE[g['se']]
      if g['se_leaf'] == 'weight':
        if a.ndim != 4 or a.shape[2:] != (1, 1):
          raise ValueError(f'timm {key}: expected an (O,I,1,1) 1x1 conv, got {a.shape}')
        leaf, a = 'w', a.reshape(a.shape[:2]).T
      else:
        leaf = 'b'
    elif g['eca']:
      module = block(int(g['s']), int(g['b']), key) + '/~/eca'
      if a.ndim != 3 or a.shape[:2] != (1, 1):
        raise ValueError(f'timm {key}: expected a (1,1,k) Conv1d kernel, got {a.shape}')
      leaf, a = 'w', a.reshape(-1)
    elif g['skip']:
      module = block(int(g['s']), int(g['b']), key)
      if a.size != 1:
        raise ValueError(f'timm {key}: expected a scalar, got shape {a.shape}')
      leaf, a = 'skip_gain', a.reshape(())
    elif g['final_leaf']:
      module = f'{top}/~/final_conv'
      leaf, a = _conv_leaf(g['final_leaf'], a, key)
    else:
      module = f'{top}/~/linear'
      if g['fc_leaf'] == 'weight':
        if a.ndim != 2:
          raise ValueError(f'timm {key}: expected (out, in), got {a.shape}')
        leaf, a = 'w', a.T
      else:
        leaf = 'b'
    if leaf in params.get(module, {}):
      raise ValueError(f'timm {key}: {module}/{leaf} given twice')
    params.setdefault(module, {})[leaf] = np.asarray(a, dtype=np.float32, order='C')
  if unknown:
    raise ValueError(f'{len(unknown)} timm keys not understood for {label}'
                     f': {param_match.format_list(unknown)}')
  fc = params.get(f'{top}/~/linear', {}).get('w')
  num_classes = int(fc.shape[1]) if fc is not None else 1000
  expected = param_match.model_shapes(name, num_classes, overrides)
  return param_match.match_to_model(params, expected, 'timm weights', name)

