"""Errors a user acts on: one wording for unknown names across the package (config
keys, models, optimizers, remat policies), `RunError` for a run that cannot go on
for a reason the command line states in one line, and `MissingExtra` for a path
that needs an optional extra (`pip install 'nfnet_jax[data]'`) not installed here."""
from __future__ import annotations

import difflib
import importlib.util
from typing import Iterable, Optional


def unknown_name(kind: str, name: str, choices: Iterable[str],
                 shown: Optional[str] = None) -> str:
  """'Unknown <kind> <shown>. Did you mean a or b? Valid: a, b, c'.

  `name` is matched against `choices` (a choice that differs only in case first, then
  difflib, up to 3 matches); `shown` replaces `repr(name)` in the message, e.g. a full
  config path such as 'config.bach_size'.
  """
  choices = [str(c) for c in choices]
  close = close_matches(str(name), choices)
  hint = f' Did you mean {" or ".join(close)}?' if close else ''
  return f'Unknown {kind} {shown or repr(name)}.{hint} Valid: {", ".join(choices)}'


def close_matches(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
  """Up to `n` of `choices` that `name` was probably meant to be, best first, ignoring
  case: 'f0' finds 'F0' (difflib alone scores that pair below its cutoff)."""
  by_lower: dict[str, list[str]] = {}
  for c in choices:
    by_lower.setdefault(c.lower(), []).append(c)
  out: list[str] = []
  if name.lower() in by_lower:  # Only the case is wrong: that is the answer.
    return by_lower[name.lower()][:n]
  for low in difflib.get_close_matches(name.lower(), list(by_lower), n=n):
    out += by_lower[low]
  return out[:n]


class RunError(RuntimeError):
  """The run cannot start or go on (a full disk, a workdir of another model, nothing
  to evaluate...). The command line prints the message alone, without a traceback,
  and exits with status 1; nothing already written is lost."""


class MissingExtra(ImportError):
  """A feature needs an optional extra that is not installed. The message is one
  line naming the extra and the pip command; the command line prints it alone."""


def missing_extra(extra: str, what: str, module: str) -> MissingExtra:
  """The error for `what`, which needs `module` of the optional `extra`:
  "<what> needs the <extra> extra (<module> is not installed): pip install ..."."""
  return MissingExtra(f'{what} needs the {extra} extra ({module} is not installed): '
                      f"pip install 'nfnet_jax[{extra}]'", name=module)


def require_extra(extra: str, what: str, *modules: str) -> None:
  """Raises MissingExtra unless each of `modules` (top-level names) is installed.
  Looks them up without importing them: a config check must not load TensorFlow."""
  for module in modules:
    if importlib.util.find_spec(module) is None:
      raise missing_extra(extra, what, module)
