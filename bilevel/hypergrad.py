"""Hypergradient estimation: second-order products (exact and finite-difference) and estimators.

Implicit-function-theorem hypergradient (docs/method.md, section 2), for one client's losses
g (inner), f (outer):

    grad Phi(x) = grad_x f(x, y) - J v,      J v = d/dy[grad_x g](x, y) v
    v*          = H^{-1} grad_y f(x, y),     H   = hess_yy g(x, y)

Products (same call shape, `PRODUCTS` by name):
  exact : forward-over-reverse autodiff, (Hv, Jv) = jvp of y -> (grad_x g, grad_y g) along v.
  fd    : second-order-free central differences of first-order gradients,
            Hv ~ [grad_y g(x, y + d v) - grad_y g(x, y - d v)] / (2 d)
            Jv ~ [grad_x g(x, y + d v) - grad_x g(x, y - d v)] / (2 d)
          with d = delta / max(||v||, eps), so the probe y +- d v has length delta.
          Bias O(delta^2) for smooth g; O(1) across ReLU kinks (docs/method.md, section 3).

Estimators are values that hold their options (`fd(num_steps=3)`, `exact(...)`, `neumann(...)`,
`cg(...)`, or a user's own `Estimator`); calling one on (problem, x, y, batches, v, masks)
gives the estimate, and `products()` its product counts. Each solves H v = grad_y f in
`solve(matvec, b, v0)` (N = num_steps v updates, Neumann terms or CG iterations):
  fd, exact : v <- v - t (H v - grad_y f), N times from the warm start v, optionally projected
              onto ||v|| <= radius; t = min(eta, r'r / r'Hr) (v_step="cauchy": the exact
              line-search step on 1/2 v'Hv - v' grad_y f capped at eta, which cannot diverge)
              or eta (v_step="fixed", the plain SOBA/SimFBO update).
  neumann   : v = eta sum_{k<max(N,1)} (I - eta H)^k grad_y f   (FedNest; exact products;
              N = 0 gives the one term eta grad_y f, as N = 1).
  cg        : conjugate gradient on H v = grad_y f from the warm start (exact products).
and returns grad_x f - J v. `ESTIMATORS` names them for the drivers' --estimator (`named`).

Dual pruning (docs/method.md, sections 3-4): with masks m_x, m_y every quantity is evaluated at
the pruned point (x*m_x, y*m_y, v*m_y) and every result is multiplied by its mask, so the
estimate equals the one computed on the extracted subproblem. v outside m_y returns as it came.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from bilevel import tree
from bilevel.errors import ConfigError, check_choice
from bilevel.problems import BilevelProblem, Loss

PyTree = Any


class HypergradResult(NamedTuple):
  hypergrad: PyTree  # like x; zero outside mask_x
  v: PyTree  # like y; the (warm-startable) linear-system solution estimate


class Products(NamedTuple):
  hv: PyTree  # H v, like y
  jv: PyTree | None  # J v, like x (None when not requested)


def exact_products(inner_loss: Loss, x: PyTree, y: PyTree, v: PyTree, batch: Any,
                   delta: float, with_jv: bool) -> Products:
  """Forward-over-reverse Hessian- and Jacobian-vector products (the second-order twin of fd)."""
  del delta
  if with_jv:
    grads = lambda yy: jax.grad(inner_loss, argnums=(0, 1))(x, yy, batch)
    _, (jv, hv) = jax.jvp(grads, (y,), (v,))
    return Products(hv, jv)
  _, hv = jax.jvp(lambda yy: jax.grad(inner_loss, argnums=1)(x, yy, batch), (y,), (v,))
  return Products(hv, None)


def fd_products(inner_loss: Loss, x: PyTree, y: PyTree, v: PyTree, batch: Any,
                delta: float, with_jv: bool, eps: float = 1e-12) -> Products:
  """Central finite differences of first-order gradients along v (no second-order autodiff).

  Both probes go through one gradient call: the difference quotient
  q(x, y+, y-) = [g(x, y+) - g(x, y-)] / (2 d), with g vmapped over the stacked probes and x
  shared, has grad_x q = J v and grad_y+ q + grad_y- q = H v. The part of g that depends on x
  only (e.g. a representation's forward pass) is then computed once, and its backward pass
  once, on the difference of the two probes' cotangents, instead of twice and subtracted.
  """
  d = delta / jnp.maximum(tree.norm(v), eps)
  probes = jax.tree.map(lambda a, b: jnp.stack([a + d * b, a - d * b]), y, v)

  def quotient(xx, ys):
    g = jax.vmap(inner_loss, (None, 0, None))(xx, ys, batch)
    return (g[0] - g[1]) * (0.5 / d)

  jv, g_probes = jax.grad(quotient, argnums=(0, 1))(x, probes) if with_jv else (
      None, jax.grad(quotient, argnums=1)(x, probes))
  return Products(jax.tree.map(lambda t: t[0] + t[1], g_probes), jv)


PRODUCTS: dict[str, Callable[..., Products]] = {"exact": exact_products, "fd": fd_products}
# Cost of one product in gradient evaluations of g (analytic FLOP accounting; measured costs are
# in BENCHMARKS.md): a jvp over reverse mode ~ 2 gradients, a central-difference pair = 2.
PRODUCT_GRAD_EVALS: dict[str, float] = {"exact": 2.0, "fd": 2.0}


def cauchy_step(cap: Any, dd: jax.Array, dhd: jax.Array) -> jax.Array:
  """min(cap, d'd / d'Hd): the exact line-search step along d on a quadratic of curvature
  d'Hd / d'd, capped at cap; cap itself when d'Hd <= 0 (the v step and inner.inner_solve)."""
  return jnp.where(dhd > 0, jnp.minimum(cap, dd / jnp.where(dhd > 0, dhd, 1.0)), cap)


class Estimator(Protocol):
  """A hypergradient estimator: a value that holds its options (e.g. fd(num_steps=3)).

  product: "fd" or "exact", the products it evaluates (costs.py prices them; a client's Cauchy
  inner step uses the same, with probe length `delta`); warm_start: whether it reads v;
  products(): (H v, J v) products per estimate. A `step_size` dataclass field is a per-run
  value of the round (federated.RoundArgs' v_lr).
  """

  product: str
  delta: float
  warm_start: bool

  def __call__(self, problem: BilevelProblem, x: PyTree, y: PyTree, inner_batch: Any,
               outer_batch: Any, v: PyTree | None = None, mask_x: PyTree | None = None,
               mask_y: PyTree | None = None) -> HypergradResult: ...

  def products(self) -> tuple[int, int]: ...


@dataclasses.dataclass(frozen=True)
class _LinearSolve:
  """An estimator that solves H v = grad_y f by `solve(matvec, b, v0)` (jaxopt's shape), then
  returns grad_x f - J v, everything at the pruned point and masked (module docstring)."""

  num_steps: int = 1  # v updates (fd, exact), Neumann terms (neumann) or CG iterations (cg)
  step_size: float = 0.1  # eta of the v update / Neumann series (cg: unused)
  delta: float = 1e-3  # finite-difference probe length (fd products)
  warm_start: ClassVar[bool] = True

  def __post_init__(self):
    n = self.num_steps
    if isinstance(n, bool) or int(n) != n or n < 0:
      raise ConfigError(f"num_steps={n!r} must be an integer >= 0.")
    for name in ("step_size", "delta"):  # a traced step size is the round's (RoundArgs)
      value = getattr(self, name)
      if not (isinstance(value, jax.Array) or value > 0):
        raise ConfigError(f"{name}={value!r} is outside the allowed range (0, inf).")
    check_choice("product", self.product, PRODUCTS)

  def __call__(self, problem: BilevelProblem, x: PyTree, y: PyTree, inner_batch: Any,
               outer_batch: Any, v: PyTree | None = None, mask_x: PyTree | None = None,
               mask_y: PyTree | None = None) -> HypergradResult:
    product = PRODUCTS[self.product]
    xm, ym = tree.masked(x, mask_x), tree.masked(y, mask_y)
    gxf, gyf = jax.grad(problem.outer_loss, argnums=(0, 1))(xm, ym, outer_batch)
    gxf, gyf = tree.masked(gxf, mask_x), tree.masked(gyf, mask_y)
    v0 = tree.masked(tree.zeros_like(y) if v is None else v, mask_y)
    matvec = lambda p: tree.masked(
        product(problem.inner_loss, xm, ym, p, inner_batch, self.delta, False).hv, mask_y)
    v_work = self.solve(matvec, gyf, v0)
    jv = product(problem.inner_loss, xm, ym, v_work, inner_batch, self.delta, True).jv
    hypergrad = tree.masked(tree.sub(gxf, jv), mask_x)
    keep_in = v is not None and mask_y is not None  # v outside m_y returns as it came in
    return HypergradResult(hypergrad, tree.where(mask_y, v_work, v) if keep_in else v_work)


@dataclasses.dataclass(frozen=True)
class _VIteration(_LinearSolve):
  """The v iteration (SOBA/SimFBO-style, from the warm start; module docstring)."""

  radius: float | None = None  # optional projection radius for v
  v_step: str = "cauchy"  # "cauchy" (min(eta, r'r / r'Hr)) or "fixed" (eta always)

  def __post_init__(self):
    super().__post_init__()
    check_choice("v_step", self.v_step, ("cauchy", "fixed"))
    if self.radius is not None and not self.radius > 0:
      raise ConfigError(f"radius={self.radius!r} must be None or in (0, inf).")

  def _project(self, v: PyTree) -> PyTree:
    if self.radius is None:
      return v
    return tree.scale(jnp.minimum(1.0, self.radius / jnp.maximum(tree.norm(v), 1e-30)), v)

  def solve(self, matvec: Callable[[PyTree], PyTree], b: PyTree, v0: PyTree) -> PyTree:
    if self.v_step == "fixed":
      def step(vk, _):
        return self._project(tree.axpy(-self.step_size, tree.sub(matvec(vk), b), vk)), None

      return jax.lax.scan(step, v0, None, length=self.num_steps)[0]

    # The Cauchy step along the residual r (t <= 1 / curvature of H along r: q decreases at
    # every step). H v_{k+1} = H v_k - t H r_k (same point and batch): one product per step.
    def step(carry, _):
      vk, hvk = carry
      r = tree.sub(hvk, b)
      hr = matvec(r)
      t = cauchy_step(self.step_size, tree.vdot(r, r), tree.vdot(r, hr))
      vk, hvk = tree.axpy(-t, r, vk), tree.axpy(-t, hr, hvk)
      if self.radius is not None:  # a projection breaks the recursion: recompute H v
        vk = self._project(vk)
        hvk = matvec(vk)
      return (vk, hvk), None

    if self.num_steps == 0:
      return v0
    return jax.lax.scan(step, (v0, matvec(v0)), None, length=self.num_steps)[0][0]

  def products(self) -> tuple[int, int]:
    """num_steps H v (fixed step); the Cauchy step adds H v at the warm start (and H v after
    every projection with a radius). One J v."""
    n = int(self.num_steps)
    if self.v_step == "cauchy" and n > 0:
      return n + 1 + (n if self.radius is not None else 0), 1
    return n, 1


class fd(_VIteration):
  """The v iteration with finite-difference products: first-order gradients only."""

  product = "fd"


class exact(_VIteration):
  """The v iteration with exact (forward-over-reverse) products."""

  product = "exact"


@dataclasses.dataclass(frozen=True)
class neumann(_LinearSolve):
  """v = eta sum_{k<max(N,1)} (I - eta H)^k grad_y f (FedNest); the warm start v is not read."""

  product: str = "exact"  # "exact" or "fd"
  warm_start: ClassVar[bool] = False

  def solve(self, matvec: Callable[[PyTree], PyTree], b: PyTree, v0: PyTree) -> PyTree:
    del v0

    def term(carry, _):
      p, acc = carry
      p = tree.axpy(-self.step_size, matvec(p), p)
      return (p, tree.add(acc, p)), None

    (_, acc), _ = jax.lax.scan(term, (b, b), None, length=max(self.num_steps - 1, 0))
    return tree.scale(self.step_size, acc)

  def products(self) -> tuple[int, int]:
    return max(int(self.num_steps) - 1, 0), 1


@dataclasses.dataclass(frozen=True)
class cg(_LinearSolve):
  """num_steps conjugate-gradient iterations on H v = grad_y f from the warm start: H v0 for the
  first residual, one H p per iteration."""

  product: str = "exact"  # "exact" or "fd"

  def solve(self, matvec: Callable[[PyTree], PyTree], b: PyTree, v0: PyTree) -> PyTree:
    safe_div = lambda a, d: jnp.where(d > 0, a / jnp.where(d > 0, d, 1.0), 0.0)

    def it(carry, _):
      vk, r, p, rr = carry
      hp = matvec(p)
      alpha = safe_div(rr, tree.vdot(p, hp))
      vk = tree.axpy(alpha, p, vk)
      r = tree.axpy(-alpha, hp, r)
      rr_new = tree.vdot(r, r)
      p = tree.axpy(safe_div(rr_new, rr), p, r)
      return (vk, r, p, rr_new), None

    r0 = tree.sub(b, matvec(v0))
    return jax.lax.scan(it, (v0, r0, r0, tree.vdot(r0, r0)), None, length=self.num_steps)[0][0]

  def products(self) -> tuple[int, int]:
    return int(self.num_steps) + 1, 1


# The estimators by name (the drivers' --estimator): `named` builds one from flat options.
ESTIMATORS: dict[str, type] = {"fd": fd, "exact": exact, "neumann": neumann, "cg": cg}


def named(name: str, **options: Any) -> Estimator:
  """ESTIMATORS[name] with those of `options` that are its fields (num_steps, step_size, delta,
  radius, v_step, product); the others do not apply to it and are ignored."""
  check_choice("estimator", name, ESTIMATORS)
  cls = ESTIMATORS[name]
  fields = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in options.items() if k in fields})


def hypergradient(problem: BilevelProblem, x: PyTree, y: PyTree, inner_batch: Any,
                  outer_batch: Any, *, estimator: str | Estimator = "fd", v: PyTree | None = None,
                  mask_x: PyTree | None = None, mask_y: PyTree | None = None,
                  **options: Any) -> HypergradResult:
  """Estimate grad Phi(x) at (x, y) on one client's batches (module docstring).

  estimator: an Estimator value, or a name of ESTIMATORS with its options as keywords
  (`named`). v: the warm start (like y; zeros if None). mask_x, mask_y: 0/1 PyTrees like x and
  y (dual pruning); None keeps everything.
  """
  if isinstance(estimator, str):
    estimator = named(estimator, **options)
  elif options:
    raise ConfigError(f"options {sorted(options)} go to the estimator value {estimator!r}.")
  return estimator(problem, x, y, inner_batch, outer_batch, v, mask_x, mask_y)
