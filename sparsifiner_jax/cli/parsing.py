"""absl flag parsing for the library's own commands (``python -m sparsifiner_jax.convert``, ``.demo``,
``.sweeps``; train.py and eval.py have theirs in ``cli.entry``).

Each command defines its flags in a ``flags.FlagValues`` of its own, built when it runs, so importing the
command's module as a library defines no global flag. Bad input (an unknown flag, a bad value, a missing
argument) is one line on stderr and exit code 2 (``errors.EXIT_USER_ERROR``); ``--help`` prints the
usage and the flags.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn, Sequence

from absl import app, flags

from sparsifiner_jax.cli import errors


def new_flags() -> flags.FlagValues:
  """An empty flag set with ``--help`` (``-h``) defined."""
  flag_values = flags.FlagValues()
  flags.DEFINE_bool("help", False, "Show this help and exit.", short_name="h", flag_values=flag_values)
  return flag_values


def fail(prog: str, message: str) -> NoReturn:
  """Bad input: ``<prog>: error: <message>`` on stderr, exit code 2."""
  print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(errors.EXIT_USER_ERROR)


def parse(flag_values: flags.FlagValues, argv: Sequence[str], *, prog: str, usage: str) -> list[str]:
  """Parses ``argv`` (the program name first, as ``sys.argv``) into ``flag_values``; returns the positional
  arguments, program name dropped (flags and positionals may mix; after ``--`` everything is positional).

  ``--help``: prints ``usage`` and the flags, exits 0. A bad flag or value: one line, exit 2 (:func:`fail`).
  """
  try:
    rest = flag_values([prog, *argv[1:]])
  except flags.Error as e:
    fail(prog, str(e))
  if flag_values["help"].value:
    print(f"usage: {prog} {usage}\n")
    print(flag_values.get_help(include_special_flags=False))
    sys.exit(0)
  return rest[1:]


def run(main: Callable[[list[str]], int]) -> NoReturn:
  """``absl.app.run(main)`` for a command that parses its own flags (:func:`parse`): ``main`` gets
  ``sys.argv`` whole and its return value is the exit code."""
  def no_global_flags(argv):
    flags.FLAGS.mark_as_parsed()   # the command's flags are its own; absl's global set stays unused
    return argv

  app.run(main, flags_parser=no_global_flags)
