"""pip install -e .  (core: models, agc, optimizer, weight loading, training on offline
data; [data]: the TF input pipeline, TFDS and image folders; [demo]: spp plots and the
notebook; [hub]: hf-hub: weights; [test]: the test suite, with every extra)."""
import pathlib

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent


def _reqs(name: str) -> list[str]:
  """Requirement lines of `name`; `-r other.txt` includes other.txt's (except the core
  requirements.txt, which install_requires already has)."""
  out = []
  for line in (here / name).read_text().splitlines():
    line = line.split('#')[0].strip()
    if line.startswith('-r'):
      included = line[2:].strip()
      if included != 'requirements.txt':
        out.extend(_reqs(included))
    elif line:
      out.append(line)
  return out


setup(
    name='nfnet_jax',
    version='0.1.0',
    description='Normalizer-Free Networks (NFNets) in JAX/Haiku: models, AGC, training.',
    long_description=(here / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['nfnet_jax', 'nfnet_jax.*']),
    package_data={'nfnet_jax': ['data/*.txt', 'data/*.json']},
    python_requires='>=3.11',
    install_requires=_reqs('requirements.txt'),
    extras_require={'data': _reqs('requirements-data.txt'),
                    'demo': _reqs('requirements-demo.txt'),
                    'hub': _reqs('requirements-hub.txt'),
                    'test': _reqs('requirements-test.txt')},
    license='Apache-2.0',
)
