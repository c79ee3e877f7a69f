"""pip install -e .  (add [test] for the test/demo extras)."""
import pathlib

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent


def _reqs(name: str) -> list[str]:
  lines = (here / name).read_text().splitlines()
  return [l.split('#')[0].strip() for l in lines
          if l.split('#')[0].strip() and not l.startswith('-r')]


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
    extras_require={'test': _reqs('requirements-test.txt')},
    license='Apache-2.0',
)
