"""Device mesh and shardings: batch over ("data", "fsdp"), parameters sharded over "fsdp" by rule.

Rule for parameters (and everything shaped like them: optimizer moments, EMA): shard the largest
dimension that the ``fsdp`` axis size divides; replicate scalars, small vectors and anything that does
not divide. With ``fsdp=1`` this is plain data parallelism.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)


class MeshError(ValueError):
  """The configured mesh does not fit the available devices."""


def make_mesh(mesh_cfg: Sequence[Sequence] | None = None, devices=None) -> Mesh:
  """Mesh from ``[("data", n), ("fsdp", m)]``; one ``-1`` takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  spec = dict(mesh_cfg or [("data", -1), ("fsdp", 1)])
  unknown = set(spec) - set(AXES)
  if unknown:
    raise MeshError(f"unknown mesh axes {sorted(unknown)}; allowed: {list(AXES)}")
  sizes = [int(spec.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise MeshError("at most one mesh axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if known <= 0 or len(devices) % known:
      raise MeshError(f"mesh {spec} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise MeshError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices but "
                    f"{len(devices)} are available; use -1 for one axis to take the rest")
  return Mesh(np.asarray(devices).reshape(sizes), AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape: Sequence[int], fsdp: int) -> P:
  if fsdp <= 1 or len(shape) == 0:
    return P()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    if shape[i] % fsdp == 0 and shape[i] >= fsdp:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(mesh: Mesh, tree):
  """NamedShardings for every array leaf of ``tree`` (abstract or concrete) by the fsdp rule."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp)), tree)


def abstract(tree, shardings):
  """``jax.ShapeDtypeStruct`` leaves of ``tree`` (abstract or concrete) with ``shardings`` (same structure):
  the targets of a checkpoint restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def _operand_mesh(args):
  """The mesh of the first operand that carries one (``jax.typeof(x).sharding``: a ``jit`` traced with
  sharded inputs, or a sharded array), or None."""
  for a in jax.tree.leaves(args):
    if isinstance(a, jax.Array):
      mesh = getattr(jax.typeof(a).sharding, "mesh", None)
      if mesh is not None and not mesh.empty:
        return mesh
  return None


def _batch_mesh(args):
  """The mesh traced code splits its batch over: the context's (``jax.set_mesh``, the surrounding
  ``jit``'s), else the one ``args`` are sharded over, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  return _operand_mesh(args) if mesh.empty else mesh


def _batch_axes(mesh) -> tuple[str, ...]:
  """The axes of ``mesh`` the batch is split over: ``AXES`` where the mesh has them, else all of its axes
  (a mesh of the caller's own naming)."""
  axes = tuple(a for a in AXES if a in mesh.axis_names)
  return axes or tuple(mesh.axis_names)


def batch_shards(args=()) -> int:
  """How many batch shards traced code runs with: the product of the batch axes of the mesh set by
  ``jax.set_mesh`` (the surrounding ``jit``'s context), else of the mesh ``args`` are sharded over; 1
  without either."""
  mesh = _batch_mesh(args)
  if mesh is None:
    return 1
  return int(np.prod([mesh.shape[a] for a in _batch_axes(mesh)]))


def per_batch_shard(fn, args: tuple, batched: tuple[bool, ...], out_batched=True):
  """``fn(*args)`` run on each device's slice of the batch (``jax.shard_map`` over the batch axes), for
  kernels that cannot be partitioned automatically (XLA FFI custom calls, Pallas).

  The mesh is the context's (``jax.set_mesh``), else the one the operands are sharded over: a plain
  ``jax.jit`` with sharded inputs needs no mesh context. ``batched[i]``: whether ``args[i]``'s leading
  dimension is the batch (split) or not (replicated, e.g. parameters, or a ``[1, ...]`` operand
  broadcast over the batch). ``out_batched`` (a bool, or a pytree prefix of bools over the outputs) says
  the same of the outputs. Without a mesh of more than one batch shard, or when the batch does not
  divide over the shards, this is plain ``fn(*args)``.
  """
  shards = batch_shards(args)
  sizes = {np.shape(a)[0] for a, b in zip(args, batched) if b}
  if len(sizes) > 1:
    raise ValueError(f"per_batch_shard: the batched arguments must share one leading size; got {sizes}")
  if shards == 1 or not sizes or sizes.pop() % shards:   # nothing to split
    return fn(*args)
  mesh = _batch_mesh(args)
  axes = _batch_axes(mesh)
  in_specs = tuple(P(axes) if b else P() for b in batched)
  out_specs = jax.tree.map(lambda b: P(axes) if b else P(), out_batched)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)
