"""The heterogeneous quadratic toy problem with a closed-form hypergradient (a test oracle).

    g_i(x, y) = 1/2 y' A_i y - y' (B_i x + b_i)
    f_i(x, y) = 1/2 ||y - c_i||^2 + rho/2 ||x - a_i||^2

With A = mean A_i (SPD), B = mean B_i, ... (global lower level, docs/method.md, section 2):
    y*(x)       = A^{-1} (B x + b)
    grad Phi(x) = rho (x - a) + B' A^{-1} (y*(x) - c)
Shapes: x [dx], y [dy]; client arrays carry a leading client axis [M, ...].
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bilevel.masks import Axes, UnitLayout
from bilevel.problems import BilevelProblem


class QuadraticData(NamedTuple):
  """Per-client coefficients of the quadratic toy problem (leading axis: client)."""

  A: jax.Array  # [M, dy, dy] SPD
  B: jax.Array  # [M, dy, dx]
  b: jax.Array  # [M, dy]
  c: jax.Array  # [M, dy]
  a: jax.Array  # [M, dx]


def quadratic_inner(x: jax.Array, y: jax.Array, d: QuadraticData) -> jax.Array:
  return 0.5 * y @ d.A @ y - y @ (d.B @ x + d.b)


def quadratic_outer(x: jax.Array, y: jax.Array, d: QuadraticData, rho: float = 0.1) -> jax.Array:
  return 0.5 * jnp.sum((y - d.c) ** 2) + 0.5 * rho * jnp.sum((x - d.a) ** 2)


QUADRATIC = BilevelProblem(quadratic_inner, quadratic_outer)


def make_quadratic(
    num_clients: int,
    dim_x: int,
    dim_y: int,
    *,
    seed: int,
    mu: float = 1.0,
    L: float = 4.0,
    heterogeneity: float = 1.0,
    separable: bool = False,
    dtype: Any = np.float64,
) -> QuadraticData:
  """Random heterogeneous clients whose mean inner Hessian has spectrum in [mu, L].

  Client i: A_i = A + h * (mu / 2) * S_i / max|eig S| with sum_i S_i = 0 (every A_i stays
  positive definite), B_i, b_i, c_i, a_i = common part + h * client part, h = heterogeneity.
  separable=True makes A_i and B_i diagonal (dim_x == dim_y): coordinate j of x only meets
  coordinate j of y, so a submodel that keeps both computes the full model's update for them
  (use `quadratic_layout` to prune them together).
  """
  if separable and dim_x != dim_y:
    raise ValueError(f"separable=True needs dim_x == dim_y, got {dim_x} and {dim_y}.")
  rng = np.random.default_rng(seed)
  eig = np.linspace(mu, L, dim_y)
  if separable:
    A = np.diag(rng.permutation(eig))
    S = np.stack([np.diag(d) for d in rng.normal(size=(num_clients, dim_y))])
  else:
    q, _ = np.linalg.qr(rng.normal(size=(dim_y, dim_y)))
    A = (q * eig) @ q.T
    S = rng.normal(size=(num_clients, dim_y, dim_y))
    S = 0.5 * (S + np.transpose(S, (0, 2, 1)))
  S -= S.mean(axis=0, keepdims=True)
  spread = max(np.abs(np.linalg.eigvalsh(S)).max(), 1e-12)
  A_i = A[None] + heterogeneity * (0.5 * mu / spread) * S

  def common_plus_client(shape):
    return rng.normal(size=shape)[None] + heterogeneity * rng.normal(size=(num_clients,) + shape)

  if separable:
    B_i = np.stack([np.diag(d) for d in common_plus_client((dim_y,))])
  else:
    B_i = common_plus_client((dim_y, dim_x)) / np.sqrt(dim_x)
  b_i, c_i, a_i = (common_plus_client((n,)) for n in (dim_y, dim_y, dim_x))
  cast = lambda z: jnp.asarray(z, dtype=dtype)
  return QuadraticData(cast(A_i), cast(B_i), cast(b_i), cast(c_i), cast(a_i))


def quadratic_layout(dim: int):
  """One unit group "coord" indexing x[j] and y[j] together (for separable problems)."""
  return UnitLayout(groups={"coord": dim}, x=Axes((("coord", 0),)), y=Axes((("coord", 0),)))


def quadratic_mean(data: QuadraticData) -> QuadraticData:
  """The global (client-averaged) coefficients."""
  return jax.tree.map(lambda z: jnp.mean(z, axis=0), data)


def quadratic_solution(x: jax.Array, data: QuadraticData) -> jax.Array:
  """y*(x) of the global inner problem."""
  m = quadratic_mean(data)
  return jnp.linalg.solve(m.A, m.B @ x + m.b)


def quadratic_hypergrad(x: jax.Array, data: QuadraticData, rho: float = 0.1) -> jax.Array:
  """grad Phi(x) = rho (x - a) + B' A^{-1} (y*(x) - c), with client-averaged coefficients."""
  m = quadratic_mean(data)
  ys = jnp.linalg.solve(m.A, m.B @ x + m.b)
  return rho * (x - m.a) + m.B.T @ jnp.linalg.solve(m.A, ys - m.c)
