"""How the command lines report errors: one line on stderr and an exit code, never a bare traceback.

A user mistake (a bad flag, config value, path, dataset or checkpoint: the exception types a command
declares) prints ``error: <message>`` and exits with 2. Anything else prints the exception's type and
message and exits with 1, pointing at ``--debug``, which shows the traceback instead.
"""

from __future__ import annotations

import sys
import traceback

EXIT_INTERNAL_ERROR = 1
EXIT_USER_ERROR = 2


def one_line(e: BaseException) -> str:
  """The message of ``e`` on one line; an embedded traceback (config file errors) becomes its last line."""
  text = str(e).strip()
  if "Traceback (most recent call last)" in text:
    text = text.split("Traceback (most recent call last)")[0] + " " + text.splitlines()[-1]
  return " ".join(text.split()) or type(e).__name__


def with_type(e: BaseException) -> str:
  """``"<ExceptionType>: <first line of its message>"``: for wrapping a library's error in ours."""
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def report(e: BaseException, user_errors: tuple[type[BaseException], ...], *, debug: bool = False,
           prog: str = "") -> int:
  """Prints ``e`` as one line on stderr (``debug``: its traceback first) and returns the exit code."""
  if debug:
    traceback.print_exception(e)
  prefix = f"{prog}: " if prog else ""
  if isinstance(e, user_errors):
    print(f"{prefix}error: {one_line(e)}", file=sys.stderr)
    return EXIT_USER_ERROR
  print(f"{prefix}error: {type(e).__name__}: {one_line(e)}"
        + ("" if debug else " (run with --debug for the traceback)"), file=sys.stderr)
  return EXIT_INTERNAL_ERROR
