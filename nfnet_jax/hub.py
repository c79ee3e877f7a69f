"""`hf-hub:` names: weights on the Hugging Face Hub, fetched with `huggingface_hub`.

`pretrained.load('hf-hub:timm/eca_nfnet_l0.ra2_in1k')` fetches the repository's
`model.safetensors` through `huggingface_hub.hf_hub_download`, which caches it as that
library does (HF_HUB_CACHE, default ~/.cache/huggingface/hub) and honours
HF_HUB_OFFLINE and HF_ENDPOINT. huggingface_hub is optional (`pip install
'nfnet_jax[hub]'`); without it, or without network and a cached copy, the error is one
line naming the file's URL, to fetch by hand and load by path.

The model is read from the repository name the way timm names its repositories,
`<owner>/<model name>.<pretrained tag>`: `timm/eca_nfnet_l0.ra2_in1k` -> `eca_nfnet_l0`.
A revision may follow an '@': `hf-hub:timm/dm_nfnet_f0.dm_in1k@main`.
"""
from __future__ import annotations

import re

__all__ = ['PREFIX', 'FILENAME', 'HubError', 'is_hub_name', 'parse', 'model_name', 'url',
           'fetch']

PREFIX = 'hf-hub:'
FILENAME = 'model.safetensors'


class HubError(RuntimeError):
  """A Hub name's file can be neither downloaded nor found in the cache (or
  huggingface_hub is not installed); the message names the URL to fetch by hand."""


_REPO_RE = re.compile(r'^([A-Za-z0-9][\w.-]*)/([\w.-]+)(?:@([\w./-]+))?$')


def is_hub_name(name: str) -> bool:
  return isinstance(name, str) and name.startswith(PREFIX)


def parse(name: str) -> tuple[str, str]:
  """'hf-hub:timm/eca_nfnet_l0.ra2_in1k@v1' -> ('timm/eca_nfnet_l0.ra2_in1k', 'v1')
  (revision 'main' when none is given). ValueError for anything else."""
  m = _REPO_RE.match(name[len(PREFIX):]) if is_hub_name(name) else None
  if m is None:
    raise ValueError(f'{name!r} is not a Hub name: expected '
                     f'"{PREFIX}<owner>/<repository>[@revision]", e.g. '
                     f'"{PREFIX}timm/eca_nfnet_l0.ra2_in1k"')
  return f'{m.group(1)}/{m.group(2)}', m.group(3) or 'main'


def model_name(name: str) -> str:
  """The model a Hub name's weights belong to: the repository name up to its first
  '.' (timm's `<model>.<tag>`), e.g. 'hf-hub:timm/dm_nfnet_f0.dm_in1k' -> 'dm_nfnet_f0',
  and timm's models that share a name with DeepMind's under `timm/`:
  'hf-hub:timm/nf_resnet50.ra2_in1k' -> 'timm/nf_resnet50'."""
  repo, _ = parse(name)
  owner, rest = repo.split('/', 1)
  model = rest.split('.', 1)[0]
  if owner == 'timm':  # timm's nf_resnet50 is registered as timm/nf_resnet50
    from nfnet_jax.models import timm_models  # pylint: disable=g-import-not-at-top
    if model in timm_models.TIMM_MODELS:
      return timm_models.registry_name(model)
  return model


def url(name: str) -> str:
  """Where the Hub serves the weights: https://huggingface.co/<repo>/resolve/<rev>/
  model.safetensors."""
  repo, revision = parse(name)
  return f'https://huggingface.co/{repo}/resolve/{revision}/{FILENAME}'


def fetch(name: str) -> str:
  """Local path of the Hub name's `model.safetensors`, downloaded into (or found in)
  huggingface_hub's cache.

  Raises ValueError for a malformed name, HubError (one line naming the URL to
  fetch by hand) when huggingface_hub is missing or the file can be neither
  downloaded nor found in the cache.
  """
  repo, revision = parse(name)
  by_hand = (f'fetch {url(name)} by hand and load it by path '
             f'(pretrained.load(path, model={model_name(name)!r}))')
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top (optional extra)
  except ImportError:
    raise HubError(f'{name}: loading Hub weights needs huggingface_hub: '
                       f"pip install 'nfnet_jax[hub]', or {by_hand}") from None
  try:
    return huggingface_hub.hf_hub_download(repo, FILENAME, revision=revision,
                                           library_name='nfnet_jax')
  except Exception as e:  # pylint: disable=broad-except (network, cache, auth, 404...)
    # The library's messages run over several lines; keep its first, name the file.
    reason = ' '.join(str(e).split('\n', 1)[0].split()) or type(e).__name__
    raise HubError(f'{name}: could not download or find in the cache '
                       f'{repo}/{FILENAME} ({type(e).__name__}: {reason[:300]}); '
                       f'{by_hand}') from None
