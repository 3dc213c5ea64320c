r"""Synthetic federated bilevel problems with a known Phi, and masks of controlled coverage: the
theory check (docs/method.md, section 10; its sweep is `coverage_rate`).

Separable problem (`SYNTHETIC`). Legend: M = clients, d = coordinates (x and y are both [d];
coordinate j of x meets only coordinate j of y). Client i, noise draws (xi_x, xi_y):

    g_i(x, y) = sum_j [ 1/2 a_ij y_j^2 - y_j (b_j x_j + e_ij) ] - y . xi_y^in
    f_i(x, y) = s * ( sum_j [ 1/2 (y_j - t_ij)^2 + k_ij cos(x_j) ] + x . xi_x + y . xi_y^out )

a_ij > 0 (strongly convex inner level), b_j shared by all clients, e, t, k heterogeneous; the cos
terms make the outer level non-convex; s is an outer-loss scale (1 for Phi; the sweep keeps 1).
`sample` draws the noise N(0, sigma^2 I) per client and local step; it enters linearly, so every
first-order gradient gets zero-mean noise of level sigma while the second-order terms (H = a_i,
J = -b) stay exact. With bars for client means (global lower level, docs/method.md, section 2):

    y*_j(x)      = (b_j x_j + ebar_j) / abar_j
    Phi(x)       = (1/M) sum_i sum_j [ 1/2 (y*_j(x) - t_ij)^2 + k_ij cos(x_j) ]
    dPhi/dx_j    = (b_j / abar_j) (y*_j(x) - tbar_j) - kbar_j sin(x_j)

With one local step (K = 1) and fixed inner and v steps (y <- y - beta grad_y g, v <- v - eta r),
a client's (y, v, x) update is affine in its coefficients and noise draws, given the state it
received: the mean over C random clients is an unbiased estimate of the full update, and
heterogeneity acts as extra sampling noise (variance ~ zeta^2 (M - C) / (C (M - 1))). As the
problem is separable, a submodel then computes the exact update of the coordinates it keeps, so
the coverage mean over the C clients that keep a coordinate divides its noise variance by C.
Neither holds under the Cauchy steps (t = min(eta, r'r / r'Hr), one scalar over all the client's
kept coordinates), and the update is not affine with K > 1 (products of coefficients across steps).

Non-separable problems (`COUPLED`, `make_coupled`): the same outer loss, and the inner loss

    g_i(x, y) = 1/2 y'A_i y - y'(B x + e_i) + (1/n) sum_r log(1 + exp(-l_ir z_ir'y)) - y . xi_y^in

with A_i = diag(a_i) + coupling * S (S symmetric, zero diagonal, spectral norm 1), B = diag(b) +
coupling * R (spectral norm of R 1) and n logistic rows (z_ir, l_ir) per client (n = 0: the
coupled quadratic). A client's gradient of its kept coordinates then reads coordinates it does
not keep (zeroed at the pruned point), so pruning biases the estimate; with n > 0 g is not
quadratic in y and the fd products are inexact (bias O(delta^2)). Phi and grad Phi come from
Newton's method on the global inner problem and the implicit function theorem; with coupling = 0
and n = 0 they equal the separable problem's.

Coverage schedules (`coverage_schedule`, `pattern_schedule`; P slots = clients per round): the
client in slot p keeps flat index j of every leaf of x and of y (so x_j and y_j are pruned
together) in round q iff (j - p - q) mod P < c_j(q), which gives index j exactly c_j(q) clients.
Even coverage: c_j = C, so C_x* = C and every client keeps C/P of the coordinates (exactly when P
divides the leaf size). Uneven:
c_j(q) = pattern[(j // P + q) mod L] (L = len(pattern)); the minimum coverage is min(pattern),
the mean over coordinates mean(pattern) (when L divides d / P), and every coordinate passes
through every entry of the pattern, so schedules with equal mean and different minimum (or the
reverse) can be compared on the same problem.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bilevel.errors import ConfigError
from bilevel.federated import MaskFn, ServerState
from bilevel.problems import BilevelProblem

PyTree = Any


class SyntheticCoeffs(NamedTuple):
  """Coefficients of the separable problem: [M, d] for all clients, [d] for one client."""

  a: jax.Array  # inner curvature, > 0
  b: jax.Array  # x-y coupling (the same for every client)
  e: jax.Array  # inner linear term
  t: jax.Array  # outer target of y
  k: jax.Array  # amplitude of the non-convex cos(x) term


class SyntheticBatch(NamedTuple):
  """What g_i and f_i are evaluated on: one client's coefficients and one noise draw."""

  coeffs: Any  # SyntheticCoeffs or CoupledCoeffs of one client
  scale: jax.Array  # [] outer-loss scale s
  noise_x: jax.Array  # [d] enters f linearly in x
  noise_y: jax.Array  # [d] enters g (inner batch) or f (outer batch) linearly in y


class SyntheticClients(NamedTuple):
  """Per-client data before sampling (leading client axis [M]); `sample` draws the noise."""

  coeffs: Any  # [M, ...] each
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
  dim = client.coeffs.e.shape[-1]
  noise = client.noise_std * jax.random.normal(key, (2, dim), client.coeffs.e.dtype)
  return SyntheticBatch(client.coeffs, client.scale, noise[0], noise[1])


def make_clients(coeffs: Any, *, noise_std: float, scale: float = 1.0,
                 salt: int = 0) -> SyntheticClients:
  """Stack per-client sampling settings next to the coefficients [M, ...]."""
  m, dtype = coeffs.e.shape[0], coeffs.e.dtype
  full = lambda value, dt: jnp.full((m,), value, dt)
  return SyntheticClients(coeffs, full(scale, dtype), full(noise_std, dtype),
                          full(salt, jnp.uint32))


def make_synthetic(num_clients: int, dim: int, *, seed: int,
                   heterogeneity: float = 0.5) -> SyntheticCoeffs:
  """Random heterogeneous clients [M, d] (float64); client i = common part + heterogeneity *
  client part.

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
  return SyntheticCoeffs(*(jnp.asarray(z, np.float64) for z in (a, b, e, t, k)))


def mean_coeffs(coeffs: Any) -> Any:
  """Client-averaged coefficients (the global lower level's)."""
  return jax.tree.map(lambda z: jnp.mean(z, axis=0), coeffs)


def solution(x: jax.Array, coeffs: SyntheticCoeffs) -> jax.Array:
  """y*(x) = (b x + ebar) / abar of the global inner problem (coeffs [M, d])."""
  m = mean_coeffs(coeffs)
  return (m.b * x + m.e) / m.a


def _outer_mean(x: jax.Array, ys: jax.Array, coeffs: Any) -> jax.Array:
  """(1/M) sum_i f_i(x, y*) without noise: Phi(x) given ys = y*(x)."""
  return jnp.mean(jnp.sum(0.5 * (ys[None] - coeffs.t) ** 2 + coeffs.k * jnp.cos(x)[None], axis=1))


def phi(x: jax.Array, coeffs: SyntheticCoeffs) -> jax.Array:
  return _outer_mean(x, solution(x, coeffs), coeffs)


def phi_grad(x: jax.Array, coeffs: SyntheticCoeffs) -> jax.Array:
  """grad Phi(x)_j = (b_j / abar_j) (y*_j(x) - tbar_j) - kbar_j sin(x_j)."""
  m = mean_coeffs(coeffs)
  return m.b / m.a * ((m.b * x + m.e) / m.a - m.t) - m.k * jnp.sin(x)


# ------------------------------------------------------------------ coverage schedules


def _schedule(num_slots: int, coverage: Callable[..., Any]) -> MaskFn:
  """A `mask_fn` for rafbo.make_round keeping j iff (j - p - q) mod P < coverage(j, q, r_x) (the
  policy and the round's key are not used: the schedule replaces them)."""

  def mask_fn(state: ServerState, client_id: jax.Array, slot: jax.Array, round_idx: jax.Array,
              rx: jax.Array, ry: jax.Array, key: jax.Array) -> tuple[PyTree, PyTree]:
    del client_id, ry, key

    def leaf(p):
      j = jnp.arange(p.size)
      keep = jnp.mod(j - slot - round_idx, num_slots) < coverage(j, round_idx, rx)
      return keep.reshape(p.shape).astype(p.dtype)

    return jax.tree.map(leaf, state.x), jax.tree.map(leaf, state.y)

  return mask_fn


def coverage_schedule(num_slots: int, coverage: int | None = None) -> MaskFn:
  """Even coverage C in 1..P, or None to read C = round(r_x P) from the client's keep ratio (a
  traced RoundArgs entry: one compiled round for every C)."""
  _check_coverages(num_slots, () if coverage is None else (coverage,), "coverage")
  if coverage is None:
    return _schedule(num_slots, lambda j, q, rx: jnp.round(rx * num_slots))
  return _schedule(num_slots, lambda j, q, rx: coverage)


def pattern_schedule(num_slots: int, pattern: Sequence[int]) -> MaskFn:
  """Uneven coverage: c_j(q) = pattern[(j // P + q) mod L]."""
  pattern = tuple(pattern)
  _check_coverages(num_slots, pattern, "pattern entry")
  if not pattern:
    raise ConfigError("pattern is empty; give at least one coverage.")
  table = tuple(int(c) for c in pattern)
  return _schedule(num_slots,
                   lambda j, q, rx: jnp.asarray(table)[jnp.mod(j // num_slots + q, len(table))])


def _check_coverages(num_slots: int, coverages: Sequence[Any], name: str) -> None:
  if int(num_slots) != num_slots or num_slots < 1:
    raise ConfigError(f"num_slots={num_slots!r} must be an integer >= 1.")
  for c in coverages:
    if int(c) != c or not 1 <= c <= num_slots:
      raise ConfigError(f"{name}={c!r} is outside the allowed range [1, {num_slots}] "
                        "(clients per round).")


# ------------------------------------------------------------------ non-separable problems


class CoupledCoeffs(NamedTuple):
  """Coefficients of the non-separable problem: leading [M] for all clients, none for one."""

  a: jax.Array  # [M, d, d] inner curvature A_i = diag(a_i) + coupling * S (symmetric)
  b: jax.Array  # [M, d, d] x-y coupling B (the same for every client)
  e: jax.Array  # [M, d] inner linear term
  t: jax.Array  # [M, d] outer target of y
  k: jax.Array  # [M, d] amplitude of the cos(x) term
  z: jax.Array  # [M, n, d] logistic features (n = 0: the coupled quadratic)
  labels: jax.Array  # [M, n] in {-1, 1}


def coupled_inner_loss(x: jax.Array, y: jax.Array, batch: SyntheticBatch) -> jax.Array:
  c = batch.coeffs
  rows = max(c.labels.shape[-1], 1)
  logistic = jnp.sum(jax.nn.softplus(-c.labels * (c.z @ y))) / rows
  return (0.5 * y @ (c.a @ y) - y @ (c.b @ x + c.e) + logistic) - jnp.sum(y * batch.noise_y)


COUPLED = BilevelProblem(coupled_inner_loss, outer_loss)  # outer_loss reads only e, t, k fields


def make_coupled(num_clients: int, dim: int, *, seed: int, heterogeneity: float = 0.5,
                 coupling: float = 0.0, logistic_rows: int = 0) -> CoupledCoeffs:
  """Non-separable clients [M, ...] on top of `make_synthetic(M, d, seed, heterogeneity)`.

  S (symmetric, zero diagonal) and R are random with spectral norm 1; coupling < 0.5 keeps every
  A_i positive definite (a_ij >= 1/2). Logistic rows: z ~ N(0, 1), labels sign(z'u + N(0, 1/4))
  for a common u; with heterogeneity 0 every client holds the same rows.
  """
  if not 0.0 <= coupling < 0.5:
    raise ConfigError(f"coupling={coupling!r} is outside the allowed range [0, 0.5).")
  if int(logistic_rows) != logistic_rows or logistic_rows < 0:
    raise ConfigError(f"logistic_rows={logistic_rows!r} must be an integer >= 0.")
  base = make_synthetic(num_clients, dim, seed=seed, heterogeneity=heterogeneity)
  rng = np.random.default_rng([seed, 1])
  s = rng.normal(size=(dim, dim))
  s = s + s.T
  np.fill_diagonal(s, 0.0)
  s /= np.linalg.norm(s, 2)
  r = rng.normal(size=(dim, dim))
  r /= np.linalg.norm(r, 2)
  u = rng.normal(size=dim)
  shape = (num_clients if heterogeneity > 0 else 1, logistic_rows, dim)
  z = np.broadcast_to(rng.normal(size=shape), (num_clients, logistic_rows, dim))
  labels = np.where(z @ u + 0.5 * rng.normal(size=shape[:2]) >= 0, 1.0, -1.0)
  eye = np.eye(dim)
  a = np.asarray(base.a)[:, :, None] * eye + coupling * s
  b = np.asarray(base.b)[:, :, None] * eye + coupling * r
  cast = lambda v: jnp.asarray(v, np.float64)
  return CoupledCoeffs(cast(a), cast(b), base.e, base.t, base.k, cast(z), cast(labels))


def _inner_grad_hess(x: jax.Array, y: jax.Array,
                     coeffs: CoupledCoeffs) -> tuple[jax.Array, jax.Array]:
  """grad_y G and hess_yy G of G(x, y) = (1/M) sum_i g_i(x, y) without noise (closed form)."""
  m = mean_coeffs(coeffs)
  rows = max(coeffs.labels.shape[-1], 1)
  margin = coeffs.labels * jnp.einsum("mnd,d->mn", coeffs.z, y)  # [M, n]
  weight = jax.nn.sigmoid(-margin)  # -d softplus(-margin) / d margin
  grad = m.a @ y - m.b @ x - m.e - jnp.einsum("mn,mnd->d", coeffs.labels * weight,
                                              coeffs.z) / (rows * coeffs.z.shape[0])
  curv = weight * (1.0 - weight)
  hess = m.a + jnp.einsum("mn,mnd,mne->de", curv, coeffs.z, coeffs.z) / (rows * coeffs.z.shape[0])
  return grad, hess


NEWTON_STEPS = 10  # quadratic convergence from the quadratic part's solution (tested: grad < 1e-12)


def coupled_solution(x: jax.Array, coeffs: CoupledCoeffs) -> jax.Array:
  """y*(x) = argmin_y G(x, y) by Newton's method (exact in one step for the coupled quadratic)."""
  m = mean_coeffs(coeffs)
  y0 = jnp.linalg.solve(m.a, m.b @ x + m.e)

  def newton(y, _):
    grad, hess = _inner_grad_hess(x, y, coeffs)
    return y - jnp.linalg.solve(hess, grad), None

  return jax.lax.scan(newton, y0, None, length=NEWTON_STEPS)[0]


def coupled_phi(x: jax.Array, coeffs: CoupledCoeffs) -> jax.Array:
  return _outer_mean(x, coupled_solution(x, coeffs), coeffs)


def coupled_phi_grad(x: jax.Array, coeffs: CoupledCoeffs) -> jax.Array:
  """grad Phi(x) = grad_x F - J v* = -kbar sin(x) + Bbar' v*, v* = H^{-1} (y*(x) - tbar), H the
  inner Hessian at y*(x) (implicit function theorem; J v = -B'v since g meets x only in -y'Bx)."""
  m = mean_coeffs(coeffs)
  ys = coupled_solution(x, coeffs)
  v = jnp.linalg.solve(_inner_grad_hess(x, ys, coeffs)[1], ys - m.t)
  return -m.k * jnp.sin(x) + m.b.T @ v
