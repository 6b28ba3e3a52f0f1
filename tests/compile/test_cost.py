"""``compile.cost``: the kernels' declared costs read from a traced program."""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparsifiner_jax.compile import cost


def _double(x):
  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2
  estimate = pl.CostEstimate(flops=10, transcendentals=1, bytes_accessed=100)
  return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True,
                        cost_estimate=estimate)(x)


def test_declared_costs_sum_nested_calls_and_scan_trips():
  def program(x):
    y = jax.jit(_double)(x)                                                 # a nested jaxpr
    y, _ = jax.lax.scan(lambda c, _: (_double(c), None), y, None, length=3)   # 3 trips
    return y

  totals = cost.declared_kernel_costs(jax.make_jaxpr(program)(jnp.ones((8, 128))))
  assert totals == {"flops": 40, "bytes accessed": 400, "transcendentals": 4, "calls": 4}
