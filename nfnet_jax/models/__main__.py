"""Prints parameters, multiply-adds (GMACs at the test resolution) and resolutions.

    python -m nfnet_jax.models            # every registered model
    python -m nfnet_jax.models F0 F1      # the named ones
"""
import argparse
from typing import Optional, Sequence

from nfnet_jax import errors
from nfnet_jax.models import registry, summary


def main(argv: Optional[Sequence[str]] = None) -> None:
  known = registry.names()
  p = argparse.ArgumentParser(
      prog='python -m nfnet_jax.models',
      description='Parameters, multiply-adds (GMACs: convs and linears of one forward '
                  'pass at the test resolution, the papers\' convention) and train/test '
                  'resolutions of registered models.',
      epilog=f'registered models: {", ".join(known)}')
  p.add_argument('names', nargs='*', metavar='MODEL',
                 help='registered model names (default: all of them)')
  args = p.parse_args(argv)
  unknown = [n for n in args.names if n not in known]
  if unknown:  # One line, suggestions ignoring case ('f0' -> F0).
    p.exit(2, f'{p.prog}: error: {errors.unknown_name("model", unknown[0], known)}\n')
  print(f'{"model":<18}{"params (M)":>12}{"GMACs @test":>14}{"train px":>10}{"test px":>9}',
        flush=True)
  for row in summary.table(args.names or known):
    print(f'{row["name"]:<18}{row["params"] / 1e6:>12.1f}{row["macs"] / 1e9:>14.2f}'
          f'{row["train_px"]:>10}{row["test_px"]:>9}')


if __name__ == '__main__':
  main()
