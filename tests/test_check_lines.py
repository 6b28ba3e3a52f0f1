"""scripts/check_lines.py, the line-length half of `make lint`."""

import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "check_lines.py"


def _run(*args, cwd):
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                        timeout=60)


def test_long_lines_are_listed_and_fail(tmp_path):
  (tmp_path / "pkg").mkdir()
  (tmp_path / "pkg" / "a.py").write_text("x = 1\n" + "y = '" + "é" * 104 + "'\n")   # 110 characters
  (tmp_path / "pkg" / "b.py").write_text("ok = 2\n" * 3 + "z = '" + "z" * 106 + "'\n")  # 112
  (tmp_path / "notes.txt").write_text("w" * 500)                                      # not Python
  r = _run("pkg", cwd=tmp_path)
  assert r.returncode == 1 and r.stdout == "pkg/b.py:4: 112 characters (limit 110)\n"
  assert _run("--limit", "112", "pkg", cwd=tmp_path).returncode == 0


def test_a_missing_path_is_one_line(tmp_path):
  r = _run("nowhere", cwd=tmp_path)
  assert r.returncode == 2 and r.stderr == "error: no such file or directory: nowhere\n"
