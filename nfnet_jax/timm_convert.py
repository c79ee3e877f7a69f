"""Converting timm's `dm_nfnet_f*` PyTorch weights into this package's NFNet params.

`from_timm(state_dict, variant)` maps timm's names to DeepMind's (the table is in its
docstring), transposes kernels and linear weights, and renames the result to the
model's own module names (via `nfnet_jax.pretrained`'s matching). Run the converted
weights with `TIMM_MODEL_OVERRIDES` to compute what timm computes.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

__all__ = ['from_timm', 'TIMM_MODEL_OVERRIDES', 'TIMM_STD_CONV_EPS']

Params = dict[str, dict[str, np.ndarray]]

# timm's ScaledStdConv2dSame for the dm_nfnet_* models: NfCfg.std_conv_eps = 1e-5 (the
# dm cfg does not override it), applied as rsqrt(var + eps) inside F.batch_norm, then
# times gain * fan_in**-0.5 (gamma_in_act=True, so no activation gamma in the conv).
TIMM_STD_CONV_EPS = 1e-5
# Model options that make converted timm weights compute what timm computes:
# `nfnet_jax.models.create('F0', **TIMM_MODEL_OVERRIDES)`.
TIMM_MODEL_OVERRIDES = dict(activation='gelu_exact', ws_eps=TIMM_STD_CONV_EPS,
                            ws_eps_mode='add')


# ---------------------------------------------------------------------------
# timm conversion.
# ---------------------------------------------------------------------------
_TIMM_STEM = {'conv1': 'stem_conv0', 'conv2': 'stem_conv1', 'conv3': 'stem_conv2',
              'conv4': 'stem_conv3'}
_TIMM_BLOCK_CONVS = {'conv1': 'conv0', 'conv2': 'conv1', 'conv2b': 'conv1b',
                     'conv3': 'conv2', 'downsample.conv': 'conv_shortcut'}
_TIMM_SE = {'fc1': 'squeeze_excite/~/linear', 'fc2': 'squeeze_excite/~/linear_1'}
_TIMM_KEY_RE = re.compile(
    r'^(?:stem\.(?P<stem>conv[1-4])\.(?P<stem_leaf>weight|bias|gain)'
    r'|stages\.(?P<s>\d+)\.(?P<b>\d+)\.(?:'
    r'(?P<conv>conv1|conv2|conv2b|conv3|downsample\.conv)\.(?P<conv_leaf>weight|bias|gain)'
    r'|attn_last\.(?P<se>fc1|fc2)\.(?P<se_leaf>weight|bias)'
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


def from_timm(state_dict: Mapping[str, Any], variant: str = 'F0') -> Params:
  """Converts a timm `dm_nfnet_f*` state_dict into this package's NFNet params.

  `state_dict` maps timm names to numpy arrays (or torch tensors / anything with
  `.numpy()`); a leading `module.` (DataParallel) is stripped. Every key must be
  consumed and every parameter of `create(variant, num_classes=<head size>)` filled,
  else ValueError names the offenders. Run the result with `TIMM_MODEL_OVERRIDES`
  (exact erf GELU, WS epsilon 1e-5 added to the variance) to compute what timm
  computes; DeepMind's defaults (tanh GELU, max(var * fan_in, 1e-4)) differ measurably
  (about 3% of the logit scale on random weights, against 1e-6 with the overrides).

  Name mapping (s = stage, b = block within the stage, i = sum(depths[:s]) + b, the
  global block index; block 0 is `nf_block`, block i > 0 `nf_block_{i}`; names below
  are DeepMind's, renamed to the model's on output):

  | timm key                             | ours, under `NFNet/~/`             | transform |
  |--------------------------------------|------------------------------------|-----------|
  | stem.conv1.{weight,bias,gain}        | stem_conv0 {w,bias,gain}           | conv      |
  | stem.conv2.*                         | stem_conv1                         | conv      |
  | stem.conv3.*                         | stem_conv2                         | conv      |
  | stem.conv4.*                         | stem_conv3                         | conv      |
  | stages.s.b.downsample.conv.*         | nf_block_i/~/conv_shortcut         | conv      |
  | stages.s.b.conv1.*                   | nf_block_i/~/conv0                 | conv      |
  | stages.s.b.conv2.*                   | nf_block_i/~/conv1                 | conv      |
  | stages.s.b.conv2b.*                  | nf_block_i/~/conv1b                | conv      |
  | stages.s.b.conv3.*                   | nf_block_i/~/conv2                 | conv      |
  | stages.s.b.attn_last.fc1.{weight,bias} | nf_block_i/~/squeeze_excite/~/linear {w,b}   | SE |
  | stages.s.b.attn_last.fc2.{weight,bias} | nf_block_i/~/squeeze_excite/~/linear_1 {w,b} | SE |
  | stages.s.b.skipinit_gain             | nf_block_i (skip_gain)             | () as is  |
  | final_conv.{weight,bias,gain}        | final_conv {w,bias,gain}           | conv      |
  | head.fc.{weight,bias}                | linear {w,b}                       | fc        |

  conv: weight (O, I/groups, kh, kw) -> w (kh, kw, I/groups, O); gain (O,1,1,1) -> (O,);
  bias (O,) as is. SE (1x1 nn.Conv2d in timm): weight (O, I, 1, 1) -> w (I, O); bias -> b.
  fc: weight (out, in) -> w (in, out); bias -> b.
  Parameter-free timm modules (activations, downsample.pool, attn_last.bn/act/gate,
  head.global_pool, drop_path) have no keys.
  """
  from nfnet_jax import pretrained  # pylint: disable=g-import-not-at-top (it imports us)
  from nfnet_jax.models import nfnet

  if variant not in nfnet.VARIANTS:
    raise ValueError(f'Unknown NFNet variant {variant!r}; valid: {list(nfnet.VARIANTS)}')
  depths = list(nfnet.VARIANTS[variant]['depth'])
  starts = np.cumsum([0] + depths)

  def block(s: int, b: int, key: str) -> str:
    if s >= len(depths) or b >= depths[s]:
      raise ValueError(f'timm {key}: stage {s} block {b} does not exist in {variant} '
                       f'(depths {depths})')
    i = int(starts[s]) + b
    return 'NFNet/~/' + ('nf_block' if i == 0 else f'nf_block_{i}')

  params: Params = {}
  unknown = []
  for key, value in state_dict.items():
    name = key[len('module.'):] if key.startswith('module.') else key
    m = _TIMM_KEY_RE.match(name)
    if m is None:
      unknown.append(key)
      continue
    a = _to_numpy(value).astype(np.float32, copy=False)
    g = m.groupdict()
    if g['stem']:
      module = 'NFNet/~/' + _TIMM_STEM[g['stem']]
      leaf, a = _conv_leaf(g['stem_leaf'], a, key)
    elif g['conv']:
      module = block(int(g['s']), int(g['b']), key) + '/~/' + _TIMM_BLOCK_CONVS[g['conv']]
      leaf, a = _conv_leaf(g['conv_leaf'], a, key)
    elif g['se']:
      module = block(int(g['s']), int(g['b']), key) + '/~/' + _TIMM_SE[g['se']]
      if g['se_leaf'] == 'weight':
        if a.ndim != 4 or a.shape[2:] != (1, 1):
          raise ValueError(f'timm {key}: expected an (O,I,1,1) 1x1 conv, got {a.shape}')
        leaf, a = 'w', a.reshape(a.shape[:2]).T
      else:
        leaf = 'b'
    elif g['skip']:
      module = block(int(g['s']), int(g['b']), key)
      if a.size != 1:
        raise ValueError(f'timm {key}: expected a scalar, got shape {a.shape}')
      leaf, a = 'skip_gain', a.reshape(())
    elif g['final_leaf']:
      module = 'NFNet/~/final_conv'
      leaf, a = _conv_leaf(g['final_leaf'], a, key)
    else:
      module = 'NFNet/~/linear'
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
    raise ValueError(f'{len(unknown)} timm keys not understood for dm_nfnet_{variant.lower()}'
                     f': {pretrained._fmt_list(unknown)}')
  fc = params.get('NFNet/~/linear', {}).get('w')
  num_classes = int(fc.shape[1]) if fc is not None else 1000
  return pretrained._match_to_model(params, pretrained.model_shapes(variant, num_classes),
                                    'timm state_dict', variant)
