"""timm's NF-family architectures as options of this package's families.

`TIMM_MODELS[timm_name]` = (registry name of the family variant it builds on, the
constructor options that make it compute what timm's model computes, the facts of
timm's pretrained config: train/test resolution, test crop fraction, interpolation).
The registry registers each under `registry_name(timm_name)`: timm's own name, or
`timm/<name>` where DeepMind's model of that name is registered already
(`nf_resnet50`, `nf_regnet_b1`). `nfnet_jax.timm_convert.from_timm` converts their
weights. docs/models.md lists what each option reproduces.
"""
from __future__ import annotations

from typing import Any

# timm's ScaledStdConv2d(Same): rsqrt(var + eps) inside F.batch_norm, times gain *
# fan_in**-0.5 (NfCfg.std_conv_eps = 1e-5, left at its default by every NF model).
TIMM_STD_CONV_EPS = 1e-5

# dm_nfnet_*: timm's port of DeepMind's F0..F6 (gamma_in_act, TF-SAME padding, skip
# gains as DeepMind's), with PyTorch's exact erf GELU and timm's WS epsilon.
DM_NFNET_OPTIONS: dict[str, Any] = dict(
    activation='gelu_exact', ws_eps=TIMM_STD_CONV_EPS, ws_eps_mode='add')

# Every other timm NF model: the activation gamma inside each WS conv, symmetric
# (PyTorch) padding, no skip gain, channels rounded to multiples of 8.
TIMM_NF_OPTIONS: dict[str, Any] = dict(
    ws_eps=TIMM_STD_CONV_EPS, ws_eps_mode='add', gamma_placement='conv',
    padding='SYMMETRIC', skipinit=False, ch_div=8)

# timm's NFNet-L layout: F-depths, group width 64, bottleneck 0.25, SiLU.
_L_OPTIONS: dict[str, Any] = dict(
    TIMM_NF_OPTIONS, activation='silu', group_size=64, bottleneck=0.25)


def _facts(train: int, test: int, crop: float, interpolation: str = 'bicubic'
           ) -> dict[str, Any]:
  return dict(train_imsize=train, test_imsize=test, crop_fraction=crop,
              interpolation=interpolation)


# timm name -> (base registry name, options, pretrained-config facts). crop_fraction
# is timm's test_crop_pct where it sets one, else crop_pct (the share of the resized
# image's short side the centre crop keeps at test time).
TIMM_MODELS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    **{f'dm_nfnet_f{i}': (f'F{i}', DM_NFNET_OPTIONS, _facts(train, test, crop))
       for i, (train, test, crop) in enumerate([
           (192, 256, 0.9), (224, 320, 0.91), (256, 352, 0.92), (320, 416, 0.94),
           (384, 512, 0.951), (416, 544, 0.954), (448, 576, 0.956)])},
    'nfnet_l0': ('F0', dict(_L_OPTIONS, se_ratio=0.25, final_conv_mult=1.5),
                 _facts(224, 288, 1.0)),
    'eca_nfnet_l0': ('F0', dict(_L_OPTIONS, attention='eca', final_conv_mult=1.5),
                     _facts(224, 288, 1.0)),
    'eca_nfnet_l1': ('F1', dict(_L_OPTIONS, attention='eca', final_conv_mult=2),
                     _facts(256, 320, 1.0)),
    'eca_nfnet_l2': ('F2', dict(_L_OPTIONS, attention='eca', final_conv_mult=2),
                     _facts(320, 384, 1.0)),
    'nf_regnet_b1': ('nf_regnet_b1', dict(TIMM_NF_OPTIONS), _facts(256, 288, 0.9)),
    'nf_resnet50': ('nf_resnet50', dict(TIMM_NF_OPTIONS, avg_pool_shortcut=True),
                    _facts(256, 288, 0.94)),
}


def registry_name(timm_name: str) -> str:
  """The registry name of a timm model: its own, or `timm/<name>` where it builds on
  DeepMind's model of the same name. Raises ValueError for a name not in TIMM_MODELS."""
  if timm_name not in TIMM_MODELS:
    from nfnet_jax import errors  # pylint: disable=g-import-not-at-top
    raise ValueError(errors.unknown_name('timm model', timm_name, TIMM_MODELS))
  return f'timm/{timm_name}' if TIMM_MODELS[timm_name][0] == timm_name else timm_name
