"""Errors a user acts on: one wording for unknown names across the package (config
keys, models, optimizers, remat policies), and `RunError` for a run that cannot go
on for a reason the command line states in one line."""
from __future__ import annotations

import difflib
from typing import Iterable, Optional


def unknown_name(kind: str, name: str, choices: Iterable[str],
                 shown: Optional[str] = None) -> str:
  """'Unknown <kind> <shown>. Did you mean a or b? Valid: a, b, c'.

  `name` is matched against `choices` (a choice that differs only in case first, then
  difflib, up to 3 matches); `shown` replaces `repr(name)` in the message, e.g. a full
  config path such as 'config.bach_size'.
  """
  choices = [str(c) for c in choices]
  same_but_case = [c for c in choices if c.lower() == str(name).lower()]
  close = same_but_case + [c for c in difflib.get_close_matches(str(name), choices, n=3)
                           if c not in same_but_case][:3 - len(same_but_case)]
  hint = f' Did you mean {" or ".join(close)}?' if close else ''
  return f'Unknown {kind} {shown or repr(name)}.{hint} Valid: {", ".join(choices)}'


class RunError(RuntimeError):
  """The run cannot start or go on (a full disk, a workdir of another model, nothing
  to evaluate...). The command line prints the message alone, without a traceback,
  and exits with status 1; nothing already written is lost."""
