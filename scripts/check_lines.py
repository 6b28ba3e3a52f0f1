"""Line-length check for `make lint`: every line of the given Python files (or of the .py files under
the given directories) is at most LIMIT characters. Prints ``path:line: N characters (limit LIMIT)``
for each longer line and exits 1 if there is one.

    python scripts/check_lines.py [--limit 110] PATH...

110 is the limit the code keeps: when it was set, 99.8 % of the lines were within it (94 % within 100).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

LIMIT = 110


def python_files(paths: list[str]) -> list[pathlib.Path]:
  """The files named, and the .py files under the directories named, in a stable order."""
  out = []
  for p in map(pathlib.Path, paths):
    out.extend(sorted(p.rglob("*.py")) if p.is_dir() else [p])
  return out


def long_lines(path: pathlib.Path, limit: int) -> list[str]:
  """``path:line: N characters (limit L)`` for each line of ``path`` longer than ``limit``."""
  text = path.read_text(encoding="utf-8")
  return [f"{path}:{i}: {len(line)} characters (limit {limit})"
          for i, line in enumerate(text.splitlines(), 1) if len(line) > limit]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--limit", type=int, default=LIMIT)
  parser.add_argument("paths", nargs="+")
  args = parser.parse_args(argv)
  missing = [p for p in args.paths if not pathlib.Path(p).exists()]
  if missing:
    print(f"error: no such file or directory: {', '.join(missing)}", file=sys.stderr)
    return 2
  found = [msg for path in python_files(args.paths) for msg in long_lines(path, args.limit)]
  print("\n".join(found), end="\n" if found else "")
  return 1 if found else 0


if __name__ == "__main__":
  sys.exit(main())
