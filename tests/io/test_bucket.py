"""Workdirs and weights in a Cloud Storage bucket, against a real GCS server on 127.0.0.1.

The server (``tests/gcs_server.py``) is started once per test process by the ``bucket`` fixture. The
train/kill/resume/eval round trip is in tests/train/test_reliability.py (parametrized over local and
bucket workdirs).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from sparsifiner_jax import models
from sparsifiner_jax.io import atomic, paths, state_dict, weights
from sparsifiner_jax.train import metrics, trainer
from sparsifiner_jax.train import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _objects(url):
  """Every object under ``url`` (names relative to it), or [] if there is none."""
  root = paths.resolve(url)
  if not root.exists():
    return []
  base = os.fspath(root).split("://", 1)[1]  # epath's walk drops the gs:// of the folders it yields
  return sorted(os.path.relpath(os.path.join(os.fspath(d), f), base) for d, _, fs in root.walk()
                for f in fs)


def _one_step_config():
  from configs import tiny_test  # pylint: disable=import-outside-toplevel
  c = tiny_test.get_config()
  c.phases.train.steps, c.phases.recon.steps, c.phases.distill.steps = 1, 0, 0
  return c


ONE = jax.devices()[:1]


# --------------------------------------------------------------------------------------------------
# The path layer.


@pytest.mark.parametrize("url,message", [
    ("s3://b/x", "s3:// is not supported; allowed: a local path or gs://BUCKET/PATH"),
    ("gs://", "'' is not a bucket name"),
    ("gs://Upper/run", "'Upper' is not a bucket name"),
    ("gs://a/run", "'a' is not a bucket name"),
    ("gs://has space/run", "'has space' is not a bucket name"),
])
def test_bad_urls_are_refused_without_contacting_anything(url, message):
  with pytest.raises(paths.PathError) as e:
    paths.resolve(url, "--workdir")
  assert str(e.value).startswith(f"--workdir={url!r}: ") and message in str(e.value)


def test_resolve_and_reachability(bucket, tmp_path):
  assert os.fspath(paths.resolve(bucket + "/run/") / "ckpt") == bucket + "/run/ckpt"
  assert os.fspath(paths.resolve("rel/x")) == os.path.abspath("rel/x")
  assert paths.check_reachable(bucket + "/run", "--workdir") == paths.resolve(bucket + "/run")
  with pytest.raises(paths.PathError, match="bucket 'no-such-bucket' does not exist"):
    paths.check_reachable("gs://no-such-bucket/run", "--workdir")
  assert paths.check_reachable(str(tmp_path / "new"), "--workdir") == paths.resolve(tmp_path / "new")


def test_atomic_writes_in_a_bucket(bucket):
  assert atomic.write_json(bucket + "/a/b.json", {"x": 1}) == bucket + "/a/b.json"
  assert json.loads(paths.resolve(bucket + "/a/b.json").read_text()) == {"x": 1}

  def fail(tmp):
    with open(tmp, "w") as f:
      f.write("half")
    raise OSError("disk full")
  with pytest.raises(OSError, match="disk full"):
    atomic.write_file(bucket + "/a/c.txt", fail)
  with pytest.raises(OSError, match="disk full"):
    atomic.write_dir(bucket + "/d", lambda tmp: fail(os.path.join(tmp, "x")), last="x")
  assert _objects(bucket) == ["a/b.json"]  # failed writes left no object behind


def test_weights_round_trip_in_a_bucket_and_incomplete_dir_refused(bucket):
  model = models.create("vit_test", rngs=nnx.Rngs(0))
  path = weights.save_weights(bucket + "/w", model, name="vit_test")
  assert path == bucket + "/w"
  assert "model.json" in _objects(path) and any(o.startswith("params/") for o in _objects(path))
  other = weights.load_weights(path, models.create("vit_test", rngs=nnx.Rngs(1)))
  want, got = state_dict.timm_state_dict(model), state_dict.timm_state_dict(other)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  # Replacing it uploads model.json last: a copy cut short before that is refused, not half-read.
  weights.save_weights(path, models.create("vit_test", rngs=nnx.Rngs(2)), name="vit_test")
  (paths.resolve(path) / "model.json").unlink()
  with pytest.raises(weights.WeightsError, match="model.json' is missing or unreadable"):
    weights.load_weights(path, model)


def test_append_logs_in_a_bucket_survive_a_reopen(bucket):
  log = metrics.AppendLog(paths.resolve(bucket + "/metrics.jsonl"))
  log.write('{"step": 1}\n')
  log.flush()
  assert paths.resolve(bucket + "/metrics.jsonl").read_text() == '{"step": 1}\n'
  log.close()
  again = metrics.AppendLog(paths.resolve(bucket + "/metrics.jsonl"))  # a resumed run appends
  again.write('{"step": 2}\n')
  again.close()
  assert paths.resolve(bucket + "/metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_tensorboard_reads_the_event_files(where, tmp_path, request):
  # pylint: disable-next=import-outside-toplevel
  from tensorboard.backend.event_processing import event_accumulator
  root = str(tmp_path / "w") if where == "local" else request.getfixturevalue("bucket")
  writer = metrics.MetricWriter(paths.resolve(root))
  writer.write(3, {"train/loss": 1.5, "eval/layer_density": [0.25, 0.5]})
  writer.write(7, {"train/loss": 0.75})
  writer.close()
  local = tmp_path / "tb"
  local.mkdir()
  for p in paths.resolve(root).joinpath("tb").iterdir():   # TensorBoard reads local copies here
    (local / p.name).write_bytes(p.read_bytes())
  acc = event_accumulator.EventAccumulator(str(local))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(3, 1.5), (7, 0.75)]
  assert [e.value for e in acc.Scalars("eval/layer_density/1")] == [0.5]


# --------------------------------------------------------------------------------------------------
# The workdir lease (object storage has no flock).


def _lease_path(url):
  return paths.resolve(url) / workdir_lib.LEASE_NAME


def _write_lease(url, **fields):
  _lease_path(url).write_text(json.dumps(dict(dict(holder="pid 1 on elsewhere", host="elsewhere",
                                                   boot="b", pid=1, token="t", seconds=60,
                                                   renewed=time.time()), **fields)))


def test_lease_refuses_a_live_holder_and_frees_a_dead_or_silent_one(bucket):
  _write_lease(bucket)  # another host, renewed just now
  with pytest.raises(workdir_lib.TrainingError, match=r"in use by another run \(pid 1 on elsewhere, "
                     r"lease renewed \d+ s ago\).*frees it 60 s after its last renewal"):
    with workdir_lib.lock_workdir(paths.resolve(bucket)):
      pass
  _write_lease(bucket, renewed=time.time() - 61)   # another host, silent for longer than its lease
  with workdir_lib.lock_workdir(paths.resolve(bucket)):
    held = json.loads(_lease_path(bucket).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
  assert not _lease_path(bucket).exists()           # released
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                        text=True, check=True)
  boot = workdir_lib._boot_id()  # pylint: disable=protected-access
  _write_lease(bucket, host=socket.gethostname(), boot=boot,
               pid=int(dead.stdout))                # this host, holder gone (killed): free at once
  with workdir_lib.lock_workdir(paths.resolve(bucket)):
    pass


def _eventually(condition, seconds=10.0):
  deadline = time.time() + seconds
  while not condition():
    assert time.time() < deadline, "timed out"
    time.sleep(0.05)


def test_an_unreadable_lease_holds_until_it_would_have_expired(bucket, monkeypatch):
  monkeypatch.setenv("SPARSIFINER_JAX_LEASE_SECONDS", "2")
  _lease_path(bucket).write_text("{not json")
  with pytest.raises(workdir_lib.TrainingError, match=r"in use by another run \(an unreadable lease"):
    with workdir_lib.lock_workdir(paths.resolve(bucket)):
      pass
  _eventually(lambda: time.time() - _lease_path(bucket).stat().mtime > 3.0)
  with workdir_lib.lock_workdir(paths.resolve(bucket)):
    assert json.loads(_lease_path(bucket).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("value", ["0", "soon", "-5"])
def test_bad_lease_length_is_refused(value, bucket, monkeypatch):
  monkeypatch.setenv("SPARSIFINER_JAX_LEASE_SECONDS", value)
  with pytest.raises(ValueError, match=f"SPARSIFINER_JAX_LEASE_SECONDS='{value}' is not allowed"):
    with workdir_lib.lock_workdir(paths.resolve(bucket)):
      pass
  assert _objects(bucket) == []


def _renewed(url) -> float:
  """The lease's renewal time, read while the holder rewrites it every 0.1 s: gcsfs reads an object's
  size, then that many bytes, so a read that straddles a rewrite of another length comes back torn
  (the holder never reads its lease while writing it); such a read is retried."""
  for _ in range(20):
    try:
      return json.loads(_lease_path(url).read_text())["renewed"]
    except ValueError:
      time.sleep(0.01)
  raise AssertionError("the lease stayed unreadable for 20 reads")


def test_lease_is_renewed(bucket, monkeypatch):
  monkeypatch.setenv("SPARSIFINER_JAX_LEASE_SECONDS", "0.4")   # renewed every 0.1 s
  with workdir_lib.lock_workdir(paths.resolve(bucket)) as lease:
    first = _renewed(bucket)
    _eventually(lambda: _renewed(bucket) > first)
    lease.check()


def test_a_takeover_stops_the_holder_and_keeps_the_new_lease(bucket):
  with workdir_lib.lock_workdir(paths.resolve(bucket)) as lease:  # first renewal: 30 s away
    _write_lease(bucket, holder="pid 9 on thief")  # someone took it over (e.g. after a long stall)
    assert not lease.renew()                        # what the renewal thread does next
    with pytest.raises(workdir_lib.TrainingError, match="taken over by pid 9 on thief"):
      lease.check()
  assert json.loads(_lease_path(bucket).read_text())["holder"] == "pid 9 on thief"  # not removed


def test_second_run_on_a_bucket_workdir_is_refused_and_writes_nothing(bucket):
  with workdir_lib.lock_workdir(paths.resolve(bucket)):  # another run holds the workdir
    with pytest.raises(workdir_lib.TrainingError, match=r"is in use by another run \(pid \d+ on "):
      trainer.train(_one_step_config(), bucket, devices=ONE)
    assert _objects(bucket) == [workdir_lib.LEASE_NAME]   # the refused run wrote nothing
  out = trainer.train(_one_step_config(), bucket, devices=ONE)
  assert out["step"] == 1
  names = _objects(bucket)
  assert "metrics.jsonl" in names and "final/model.json" in names and workdir_lib.LEASE_NAME not in names


# --------------------------------------------------------------------------------------------------
# The commands.


@pytest.mark.parametrize("flag,url,message", [
    ("--workdir", "gs://no-such-bucket/run", "bucket 'no-such-bucket' does not exist"),
    ("--workdir", "gs://Bad_Bucket/run", "'Bad_Bucket' is not a bucket name"),
    ("--out", "gs://no-such-bucket/eval.json", "bucket 'no-such-bucket' does not exist"),
])
def test_bad_bucket_url_is_one_line_and_writes_nothing(flag, url, message, bucket, tmp_path):
  script = "train.py" if flag == "--workdir" else "eval.py"
  extra = [] if flag == "--workdir" else ["--workdir", bucket + "/run"]
  r = subprocess.run([sys.executable, str(ROOT / script), "--config", str(ROOT / "configs/tiny_test.py"),
                      flag, url, *extra], cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                     capture_output=True, text=True, timeout=300)
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert r.returncode == 2, r.stderr
  assert len(lines) == 1 and message in lines[0] and lines[0].startswith("error: "), r.stderr
  assert list(tmp_path.iterdir()) == [] and _objects(bucket) == []


def test_unreachable_bucket_is_one_line_within_seconds(tmp_path):
  """A Cloud Storage endpoint nothing listens on (a closed port on 127.0.0.1): train.py prints one line
  naming the cause and exits 2 within ``paths.REACH_SECONDS`` plus start-up, with no traceback (gcsfs
  alone retried for over a minute, printing about 100 lines of tracebacks)."""
  import gcs_server  # pylint: disable=import-outside-toplevel  # tests/ is on sys.path (conftest)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # closed when the block ends: connections are refused
  env = dict(os.environ, JAX_PLATFORMS="cpu", **gcs_server.client_env(port))
  start = time.monotonic()
  r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny_test.py"),
                      "--workdir", "gs://some-bucket/run"], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=300)
  elapsed = time.monotonic() - start
  assert r.returncode == 2, r.stderr
  assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert r.stderr.startswith("error: --workdir='gs://some-bucket/run': cannot reach bucket "
                             f"'some-bucket' (TimeoutError: no answer in {paths.REACH_SECONDS:g} s; "
                             "last error ClientConnectorError: Cannot connect to host "
                             f"127.0.0.1:{port}"), r.stderr
  assert elapsed < paths.REACH_SECONDS + 40, elapsed  # start-up takes seconds; before: over 60 s
  assert list(tmp_path.iterdir()) == []
