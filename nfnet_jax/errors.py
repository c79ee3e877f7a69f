"""One wording for "unknown name" errors across the package (config keys, models,
optimizers, remat policies): the closest matches first, then every valid name."""
from __future__ import annotations

import difflib
from typing import Iterable, Optional


def unknown_name(kind: str, name: str, choices: Iterable[str],
                 shown: Optional[str] = None) -> str:
  """'Unknown <kind> <shown>. Did you mean a or b? Valid: a, b, c'.

  `name` is matched against `choices` (difflib, up to 3 matches); `shown` replaces
  `repr(name)` in the message, e.g. a full config path such as 'config.bach_size'.
  """
  choices = [str(c) for c in choices]
  close = difflib.get_close_matches(str(name), choices, n=3)
  hint = f' Did you mean {" or ".join(close)}?' if close else ''
  return f'Unknown {kind} {shown or repr(name)}.{hint} Valid: {", ".join(choices)}'
