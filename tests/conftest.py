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


def dotted_parent(config, path: str):
  """``(node, key)`` with ``node[key]`` the field ``path`` names: ``"a.b.c"`` -> ``(config.a.b, "c")``."""
  *parents, leaf = path.split(".")
  node = config
  for key in parents:
    node = node[key]
  return node, leaf


def override(config, **fields):
  """Sets each field named by a dotted key (``**{"phases.recon.steps": 2}``) on ``config``; returns it."""
  for path, value in fields.items():
    node, leaf = dotted_parent(config, path)
    node[leaf] = value
  return config


def random_images(b: int, size: int, seed: int = 0):
  """``[b, size, size, 3]`` float32 standard-normal images from ``jax.random.key(seed)``."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.random.normal(jax.random.key(seed), (b, size, size, 3), "float32")


def topk_rows(scores, k: int):
  """Boolean keep mask ``[..., N]``: the ``k`` largest of each row of ``scores [..., N]`` (``lax.top_k``)."""
  import jax  # pylint: disable=g-import-not-at-top
  _, idx = jax.lax.top_k(scores, k)
  return jax.numpy.sum(jax.nn.one_hot(idx, scores.shape[-1], dtype="int32"), axis=-2) > 0


def random_topk_rows(shape: tuple[int, ...], k: int, seed: int):
  """Boolean ``shape = [..., N]`` with ``k`` random keys per row: ``topk_rows`` of uniform scores."""
  import jax  # pylint: disable=g-import-not-at-top
  return topk_rows(jax.random.uniform(jax.random.key(seed), shape), k)


def v5e_mesh():
  """A compile-only 4-chip v5e mesh with one axis, ``"data"`` (needs libtpu, not a TPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sparsifiner_jax.compile import targets  # pylint: disable=g-import-not-at-top
  return jax.sharding.Mesh(np.array(targets.devices("v5e:2x2")), ("data",))


def windowed_and_whole(monkeypatch, module, run):
  """``run()`` (arrays) traced for TPU twice, interpreted: for an unknown chip (kernel operands in
  windows) and for a v5e (small operands read whole from VMEM, ``common.whole_in_vmem``). Returns
  ``([windowed, whole], decided)``: each run's arrays in NumPy, and every decision ``module.whole_in_vmem``
  took, in order."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sparsifiner_jax.attention import backend  # pylint: disable=g-import-not-at-top
  decided = []
  decide = module.whole_in_vmem
  monkeypatch.setattr(module, "whole_in_vmem", lambda x: decided.append(decide(x)) or decided[-1])
  results = []
  for kind in (None, "TPU v5 lite"):
    with backend.compiling_for("tpu", interpret=True, device_kind=kind):
      results.append([np.asarray(x) for x in run()])
  return results, decided


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
