"""Prints parameters, FLOPs (multiply-adds at test resolution) and resolutions."""
import sys

from nfnet_jax.models import registry, summary


def main(argv: list[str]) -> None:
  names = argv[1:] or registry.names()
  print(f'{"model":<16}{"params (M)":>12}{"GMACs @test":>14}{"train px":>10}{"test px":>9}', flush=True)
  for row in summary.table(names):
    print(f'{row["name"]:<16}{row["params"] / 1e6:>12.1f}{row["flops"] / 1e9:>14.2f}'
          f'{row["train_px"]:>10}{row["test_px"]:>9}')


if __name__ == '__main__':
  main(sys.argv)
