"""Model zoo: NFNets (F0..F7, F0+..F7+), NF-ResNets and NF-RegNets, and timm's NF-family
architectures as options of them (`timm_models`)."""
from nfnet_jax.models.base import REMAT_POLICIES
from nfnet_jax.models.bn_resnet import BNResNet
from nfnet_jax.models.nf_regnet import NFRegNet
from nfnet_jax.models.nf_resnet import NFResNet
from nfnet_jax.models.nfnet import NFNet
from nfnet_jax.models import timm_models
from nfnet_jax.models.registry import create, info, is_stateful, module_fn, names
from nfnet_jax.models.summary import count_macs, count_params, summarize

__all__ = ['NFNet', 'NFResNet', 'NFRegNet', 'REMAT_POLICIES', 'create', 'info',
           'module_fn', 'names', 'count_params', 'count_macs', 'summarize', 'timm_models']
