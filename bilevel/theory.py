"""Theory check (docs/method.md, section 10): a synthetic problem with closed-form Phi,
controlled coverage.

Synthetic separable federated bilevel problem. Legend: M = clients, d = coordinates (x and y are
both [d]; coordinate j of x meets only coordinate j of y). Client i, batch noise (xi_x, xi_y):

    g_i(x, y) = sum_j [ 1/2 a_ij y_j^2 - y_j (b_j x_j + e_ij) ] - y . xi_y^in
    f_i(x, y) = s * ( sum_j [ 1/2 (y_j - t_ij)^2 + k_ij cos(x_j) ] + x . xi_x + y . xi_y^out )

a_ij > 0 (strongly convex inner level), b_j shared by all clients, e, t, k heterogeneous; the
cos terms make the outer level non-convex. The noise vectors are drawn by `sample` per client and
local step, N(0, sigma^2 I), and enter the losses linearly, so every first-order gradient gets
zero-mean noise of level sigma while the second-order terms (H = a_i, J = -b) stay exact (g
reads only xi_y of its batch).
s is the outer-loss scale (1 for Phi): the theory experiment puts the Q- and C-dependent factor of
the outer step size into s, so that one compiled round serves every Q (the x update is
-outer_lr * s * hypergradient, and the v iteration is linear, so v simply tracks s v*).

With bars for client means (global lower level, docs/method.md, section 2):

    y*_j(x)      = (b_j x_j + ebar_j) / abar_j
    Phi(x)       = (1/M) sum_i sum_j [ 1/2 (y*_j(x) - t_ij)^2 + k_ij cos(x_j) ]
    dPhi/dx_j    = (b_j / abar_j) (y*_j(x) - tbar_j) - kbar_j sin(x_j)

Every client-specific coefficient enters a client's (y, v, x) update affinely, so with one local
step the mean over a uniformly random set of C clients is an unbiased estimate of the full update;
heterogeneity then acts as extra sampling noise (variance ~ zeta^2 (M - C) / (C (M - 1))).

Controlled coverage (`coverage_schedule`): with P slots (clients per round) and coverage C,
coordinate j belongs to block j mod P, and the client in slot p keeps block b in round q iff
(b - p - q) mod P < C. Every coordinate of x (and of y, pruned together with x) is then kept by
exactly C clients in every round, each client keeps C/P of the coordinates, so the minimum outer
coverage is C_x* = C. Because the problem is separable, a submodel computes the exact update of
the coordinates it keeps (zeroing the others changes nothing for them), so each client works on
a C/P share of the model and the coverage mean over the C clients that keep a coordinate divides
the noise variance of its update by C.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bilevel.errors import ConfigError
from bilevel.federated import MaskFn, ServerState
from bilevel.problems import BilevelProblem

PyTree = Any


class SyntheticCoeffs(NamedTuple):
  """Coefficients of the synthetic problem: [M, d] for all clients, [d] for one client."""

  a: jax.Array  # inner curvature, > 0
  b: jax.Array  # x-y coupling (the same for every client)
  e: jax.Array  # inner linear term
  t: jax.Array  # outer target of y
  k: jax.Array  # amplitude of the non-convex cos(x) term


class SyntheticBatch(NamedTuple):
  """What g_i and f_i are evaluated on: one client's coefficients and one noise draw."""

  coeffs: SyntheticCoeffs  # [d] each
  scale: jax.Array  # [] outer-loss scale s (1 for Phi)
  noise_x: jax.Array  # [d] enters f linearly in x
  noise_y: jax.Array  # [d] enters g (inner batch) or f (outer batch) linearly in y


class SyntheticClients(NamedTuple):
  """Per-client data before sampling (leading client axis [M]); `sample` draws the noise."""

  coeffs: SyntheticCoeffs  # [M, d] each
  scale: jax.Array  # [M] outer-loss scale
  noise_std: jax.Array  # [M] sigma
  salt: jax.Array  # [M] uint32 folded into the batch key (per-seed noise without retracing)


def inner_loss(x: jax.Array, y: jax.Array, batch: SyntheticBatch) -> jax.Array:
  c = batch.coeffs
  return jnp.sum(0.5 * c.a * y**2 - y * (c.b * x + c.e)) - jnp.sum(y * batch.noise_y)


def outer_loss(x: jax.Array, y: jax.Array, batch: SyntheticBatch) -> jax.Array:
  c = batch.coeffs
  clean = jnp.sum(0.5 * (y - c.t) ** 2 + c.k * jnp.cos(x))
  return batch.scale * (clean + jnp.sum(x * batch.noise_x) + jnp.sum(y * batch.noise_y))


SYNTHETIC = BilevelProblem(inner_loss, outer_loss)


def sample(client: SyntheticClients, key: jax.Array) -> SyntheticBatch:
  """(one client's data, key) -> batch with fresh N(0, sigma^2) noise vectors (a client.Sampler)."""
  key = jax.random.fold_in(key, client.salt)
  dim = client.coeffs.a.shape[-1]
  noise = client.noise_std * jax.random.normal(key, (2, dim), client.coeffs.a.dtype)
  return SyntheticBatch(client.coeffs, client.scale, noise[0], noise[1])


def make_synthetic(num_clients: int, dim: int, *, seed: int, heterogeneity: float = 0.5,
                   dtype: Any = np.float64) -> SyntheticCoeffs:
  """Random heterogeneous clients [M, d]; client i = common part + heterogeneity * client part.

  abar_j ~ U[1, 2], a_ij = abar_j (1 + h u_ij / 2) with u zero-mean over clients and |u| <= 1
  (so a_ij >= abar_j / 2 > 0 for h <= 1); |b_j| ~ U[0.8, 1.5] with a random sign; e, t ~ N(0, 1)
  common + h N(0, 1) per client (centred); kbar_j ~ U[0.5, 1.5], k_ij = kbar_j (1 + h w_ij / 2).
  The outer curvature (b/abar)^2 - kbar cos(x) is negative near x = 0 for most coordinates.
  """
  if not 0.0 <= heterogeneity <= 1.0:
    raise ConfigError(f"heterogeneity={heterogeneity!r} is outside the allowed range [0, 1].")
  rng = np.random.default_rng(seed)

  def uniform_centred():  # [M, d], zero mean over clients, |.| <= 1
    z = rng.uniform(-1.0, 1.0, size=(num_clients, dim))
    z -= z.mean(axis=0, keepdims=True)
    return z / max(np.abs(z).max(), 1.0)

  def normal_centred():  # [M, d], zero mean over clients
    z = rng.normal(size=(num_clients, dim))
    return z - z.mean(axis=0, keepdims=True)

  # Common parts first, so that every num_clients gives the same Phi (client parts are centred).
  abar = rng.uniform(1.0, 2.0, dim)
  b = rng.choice([-1.0, 1.0], dim) * rng.uniform(0.8, 1.5, dim)
  kbar = rng.uniform(0.5, 1.5, dim)
  ebar, tbar = rng.normal(size=dim), rng.normal(size=dim)
  a = abar * (1.0 + 0.5 * heterogeneity * uniform_centred())
  k = kbar * (1.0 + 0.5 * heterogeneity * uniform_centred())
  e = ebar + heterogeneity * normal_centred()
  t = tbar + heterogeneity * normal_centred()
  b = np.broadcast_to(b, (num_clients, dim))
  cast = lambda z: jnp.asarray(z, dtype=dtype)
  return SyntheticCoeffs(cast(a), cast(b), cast(e), cast(t), cast(k))


def make_clients(coeffs: SyntheticCoeffs, *, noise_std: float, scale: float = 1.0,
                 salt: int = 0) -> SyntheticClients:
  """Stack per-client sampling settings next to the coefficients [M, d]."""
  m = coeffs.a.shape[0]
  dtype = coeffs.a.dtype
  return SyntheticClients(coeffs, jnp.full((m,), scale, dtype), jnp.full((m,), noise_std, dtype),
                          jnp.full((m,), salt, jnp.uint32))


def mean_coeffs(coeffs: SyntheticCoeffs) -> SyntheticCoeffs:
  """Client-averaged coefficients [d]."""
  return jax.tree.map(lambda z: jnp.mean(z, axis=0), coeffs)


def solution(x: jax.Array, coeffs: SyntheticCoeffs) -> jax.Array:
  """y*(x) = (b x + ebar) / abar of the global inner problem (coeffs [M, d])."""
  m = mean_coeffs(coeffs)
  return (m.b * x + m.e) / m.a


def phi(x: jax.Array, coeffs: SyntheticCoeffs) -> jax.Array:
  """Phi(x) = (1/M) sum_i f_i(x, y*(x)) without noise and with s = 1."""
  ys = solution(x, coeffs)
  return jnp.mean(jnp.sum(0.5 * (ys[None] - coeffs.t) ** 2 + coeffs.k * jnp.cos(x)[None], axis=1))


def phi_grad(x: jax.Array, coeffs: SyntheticCoeffs) -> jax.Array:
  """grad Phi(x)_j = (b_j / abar_j) (y*_j(x) - tbar_j) - kbar_j sin(x_j)."""
  m = mean_coeffs(coeffs)
  return m.b / m.a * ((m.b * x + m.e) / m.a - m.t) - m.k * jnp.sin(x)


# ------------------------------------------------------------------ controlled coverage


def coverage_blocks(num_slots: int, coverage: int, slot: jax.typing.ArrayLike,
                    round_idx: jax.typing.ArrayLike, shape: tuple[int, ...]) -> jax.Array:
  """bool [shape]: flat index j is kept iff ((j mod P) - slot - round) mod P < C."""
  block = jnp.arange(int(np.prod(shape))) % num_slots
  return (jnp.mod(block - slot - round_idx, num_slots) < coverage).reshape(shape)


def coverage_schedule(num_slots: int, coverage: int) -> MaskFn:
  """A `mask_fn` for rounds.make_round giving every coordinate exactly C clients per round.

  num_slots: clients per round P; coverage: C in 1..P. The same rule is applied to every leaf
  of x and of y by flat index, so with x and y of equal shape x_j and y_j are pruned together.
  The keep ratio of every client is C/P (exactly when P divides the leaf size). The resource
  levels, the policy and the key of the round are not used: the schedule replaces them.
  """
  if int(num_slots) != num_slots or num_slots < 1:
    raise ConfigError(f"num_slots={num_slots!r} must be an integer >= 1.")
  if int(coverage) != coverage or not 1 <= coverage <= num_slots:
    raise ConfigError(f"coverage={coverage!r} is outside the allowed range [1, {num_slots}] "
                      "(clients per round).")

  def mask_fn(state: ServerState, client_id: jax.Array, slot: jax.Array, round_idx: jax.Array,
              rx: jax.Array, ry: jax.Array, key: jax.Array) -> tuple[PyTree, PyTree]:
    del client_id, rx, ry, key
    side = lambda params: jax.tree.map(
        lambda p: coverage_blocks(num_slots, coverage, slot, round_idx, p.shape).astype(p.dtype),
        params)
    return side(state.x), side(state.y)

  return mask_fn
