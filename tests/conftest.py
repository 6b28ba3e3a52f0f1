"""Test setup: 8 fake CPU devices (before JAX starts), offline HF hub, torchvision op shim for timm.

JAX runs on CPU only: libtpu is installed to compile for TPU topologies, and without the pin JAX would try
(and loudly fail) to open a TPU at start-up. Compile-only topologies do not need the TPU platform."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # test workers each load libtpu to compile

import pathlib  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import gcs_server  # noqa: E402  pylint: disable=wrong-import-position


def import_timm():
  """Imports timm against the CPU torch wheel (``sparsifiner_jax.io.timm_compat``), or skips saying why."""
  pytest.importorskip("torch", reason="torch not installed (pip install -r requirements-test.txt)")
  from sparsifiner_jax.io import timm_compat  # pylint: disable=g-import-not-at-top
  timm_compat.register_torchvision_op_schemas()
  return pytest.importorskip("timm", reason="timm not installed (pip install -r requirements-test.txt)")


def need_compiler_for(topology: str) -> None:
  """Skips a test that compiles for a GPU ``topology`` when XLA's GPU compiler is not installed (``make
  gpu-compiler``); under CI, where ``.ci/run`` installs it, its absence fails the test instead."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from sparsifiner_jax.compile import targets  # pylint: disable=g-import-not-at-top
  if targets.platform(topology) != "gpu" or importlib.util.find_spec("jax_plugins.xla_cuda12"):
    return
  message = "XLA's GPU compiler is not installed (make gpu-compiler: pip install -r requirements-gpu.txt)"
  if os.environ.get("CI"):
    pytest.fail(message)
  pytest.skip(message)


@pytest.fixture(scope="session")
def timm():
  return import_timm()


@pytest.fixture(scope="session")
def gcs_server_env(tmp_path_factory):
  """Starts a Cloud Storage server on 127.0.0.1 (``tests/gcs_server.py``, bucket ``test-bucket``) for
  this test process; yields the variables that point clients at it. Its log goes to a file: a pipe
  nobody reads would fill up and stall the server."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  log = tmp_path_factory.mktemp("gcs_server") / "server.log"
  with open(log, "w") as err:
    proc = subprocess.Popen([sys.executable, gcs_server.__file__, str(port), "test-bucket"],
                            stdout=subprocess.PIPE, stderr=err, text=True)
  try:
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"the test GCS server did not start: {line}{log.read_text()}"
    yield gcs_server.client_env(port)
  finally:
    proc.kill()
    proc.wait()


@pytest.fixture
def bucket(gcs_server_env, monkeypatch, request):
  """A fresh ``gs://test-bucket/<test>-<id>`` URL, with this process's clients pointed at the server."""
  for k, v in gcs_server_env.items():
    monkeypatch.setenv(k, v)
  from sparsifiner_jax.io import paths  # pylint: disable=import-outside-toplevel  # sets EPATH_USE_TF
  import gcsfs  # pylint: disable=import-outside-toplevel
  gcsfs.GCSFileSystem.clear_instance_cache()  # an instance made before the variables were set
  del paths
  name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
  return f"gs://test-bucket/{name}-{uuid.uuid4().hex[:8]}"
