"""Hypergradient estimation: second-order products (exact and finite-difference) and estimators.

Implicit-function-theorem hypergradient (docs/method.md, section 2), for one client's losses
g (inner), f (outer):

    grad Phi(x) = grad_x f(x, y) - J v,      J v = d/dy[grad_x g](x, y) v
    v*          = H^{-1} grad_y f(x, y),     H   = hess_yy g(x, y)

Products (same call shape, registry `PRODUCTS`):
  exact : forward-over-reverse autodiff, (Hv, Jv) = jvp of y -> (grad_x g, grad_y g) along v.
  fd    : second-order-free central differences of first-order gradients,
            Hv ~ [grad_y g(x, y + d v) - grad_y g(x, y - d v)] / (2 d)
            Jv ~ [grad_x g(x, y + d v) - grad_x g(x, y - d v)] / (2 d)
          with d = delta / max(||v||, eps), so the probe y +- d v has length delta.
          Bias O(delta^2) for smooth g; O(1) across ReLU kinks (docs/method.md, section 3).

Estimators (same signature, registry `ESTIMATORS`; `num_steps` means the number of v updates,
Neumann terms or CG iterations):
  fd, exact : v <- v - t (H v - grad_y f), num_steps times from the warm start v,
              optionally projected onto ||v|| <= radius; then grad_x f - J v. The step t is
              min(eta, r'r / r'Hr) along the residual r = H v - grad_y f (v_step="cauchy",
              the default: the exact line-search step on 1/2 v'Hv - v' grad_y f, capped at
              eta, so the iteration cannot diverge when eta lambda_max(H) > 2), or eta
              (v_step="fixed", the plain SOBA/SimFBO update).
  neumann   : v = eta sum_{k<max(N,1)} (I - eta H)^k grad_y f   (FedNest; exact products;
              N = 0 gives the one term eta grad_y f, as N = 1).
  cg        : conjugate gradient on H v = grad_y f from the warm start (exact products).

Dual pruning (docs/method.md, sections 3-4): with masks m_x, m_y every quantity is evaluated at
the pruned point (x*m_x, y*m_y, v*m_y) and every result is multiplied by its mask, so the
estimate equals the one computed on the extracted subproblem. Entries of v outside m_y are returned as they came in.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

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


V_STEPS = ("cauchy", "fixed")


class EstimatorOptions(NamedTuple):
  """An estimator's options, at their defaults (the one place they are defined)."""

  num_steps: int = 1  # v updates (fd, exact), Neumann terms (neumann) or CG iterations (cg)
  step_size: float = 0.1  # eta of the v update / Neumann series
  delta: float = 1e-3  # finite-difference probe length (fd products only)
  radius: float | None = None  # optional projection radius for v (fd, exact)
  product: str = "exact"  # used by neumann and cg; fd/exact fix their own
  v_step: str = "cauchy"  # fd / exact: "cauchy" (min(eta, r'r / r'Hr)) or "fixed" (eta always)


def cauchy_step(cap: Any, dd: jax.Array, dhd: jax.Array) -> jax.Array:
  """min(cap, d'd / d'Hd): the exact line-search step along d on a quadratic of curvature
  d'Hd / d'd, capped at cap; cap itself when d'Hd <= 0 (the v step and inner.inner_solve)."""
  return jnp.where(dhd > 0, jnp.minimum(cap, dd / jnp.where(dhd > 0, dhd, 1.0)), cap)


def _project(v: PyTree, radius: float | None) -> PyTree:
  if radius is None:
    return v
  n = tree.norm(v)
  return tree.scale(jnp.minimum(1.0, radius / jnp.maximum(n, 1e-30)), v)


def _setup(problem, x, y, outer_batch, v, mask_x, mask_y):
  xm, ym = tree.masked(x, mask_x), tree.masked(y, mask_y)
  gxf, gyf = jax.grad(problem.outer_loss, argnums=(0, 1))(xm, ym, outer_batch)
  v0 = tree.zeros_like(y) if v is None else v
  return xm, ym, tree.masked(gxf, mask_x), tree.masked(gyf, mask_y), tree.masked(v0, mask_y)


def _masked_hv(problem, product, xm, ym, p, inner_batch, mask_y, opts) -> PyTree:
  """H p on the pruned point, masked to m_y (the product every estimator iterates)."""
  return tree.masked(product(problem.inner_loss, xm, ym, p, inner_batch, opts.delta, False).hv,
                     mask_y)


def _finish(problem, product, xm, ym, v_work, v_in, gxf, inner_batch, mask_x, mask_y, opts):
  jv = product(problem.inner_loss, xm, ym, v_work, inner_batch, opts.delta, True).jv
  hypergrad = tree.masked(tree.sub(gxf, jv), mask_x)
  keep_in = v_in is not None and mask_y is not None  # v outside m_y returns as it came in
  return HypergradResult(hypergrad, tree.where(mask_y, v_work, v_in) if keep_in else v_work)


def _v_iteration(product_name: str):
  product = PRODUCTS[product_name]

  def estimator(problem: BilevelProblem, x, y, inner_batch, outer_batch, v, mask_x, mask_y,
                opts: EstimatorOptions) -> HypergradResult:
    xm, ym, gxf, gyf, v0 = _setup(problem, x, y, outer_batch, v, mask_x, mask_y)
    hv_of = lambda p: _masked_hv(problem, product, xm, ym, p, inner_batch, mask_y, opts)

    if opts.v_step == "fixed":
      def step(vk, _):
        return _project(tree.axpy(-opts.step_size, tree.sub(hv_of(vk), gyf), vk),
                        opts.radius), None

      v_work, _ = jax.lax.scan(step, v0, None, length=opts.num_steps)
    else:
      # Cauchy step on q(v) = 1/2 v'Hv - v' grad_y f along the residual r = H v - grad_y f:
      # t = min(eta, r'r / r'Hr), the exact line-search step capped at eta. r'Hr / r'r is the
      # curvature of H along r, so t never exceeds 1 / curvature and q decreases at every step
      # whatever eta * lambda_max(H) is (the fixed step diverges once eta lambda_max > 2).
      # H v_{k+1} = H v_k - t H r_k (same point and batch), so each step costs one product.
      def step(carry, _):
        vk, hvk = carry
        r = tree.sub(hvk, gyf)
        hr = hv_of(r)
        t = cauchy_step(opts.step_size, tree.vdot(r, r), tree.vdot(r, hr))
        vk, hvk = tree.axpy(-t, r, vk), tree.axpy(-t, hr, hvk)
        if opts.radius is not None:  # a projection breaks the recursion: recompute H v
          vk = _project(vk, opts.radius)
          hvk = hv_of(vk)
        return (vk, hvk), None

      if opts.num_steps > 0:
        (v_work, _), _ = jax.lax.scan(step, (v0, hv_of(v0)), None, length=opts.num_steps)
      else:
        v_work = v0
    return _finish(problem, product, xm, ym, v_work, v, gxf, inner_batch, mask_x, mask_y, opts)

  estimator.__doc__ = f"v-iteration with {product_name} products (SOBA/SimFBO-style, warm start)."
  return estimator


def neumann_estimator(problem: BilevelProblem, x, y, inner_batch, outer_batch, v, mask_x, mask_y,
                      opts: EstimatorOptions) -> HypergradResult:
  """v = eta sum_{k<max(N,1)} (I - eta H)^k grad_y f (FedNest); the warm start v is not used."""
  product = PRODUCTS[opts.product]
  xm, ym, gxf, gyf, _ = _setup(problem, x, y, outer_batch, None, mask_x, mask_y)

  def term(carry, _):
    p, acc = carry
    hp = _masked_hv(problem, product, xm, ym, p, inner_batch, mask_y, opts)
    p = tree.axpy(-opts.step_size, hp, p)
    return (p, tree.add(acc, p)), None

  (_, acc), _ = jax.lax.scan(term, (gyf, gyf), None, length=max(opts.num_steps - 1, 0))
  v_work = tree.scale(opts.step_size, acc)
  return _finish(problem, product, xm, ym, v_work, v, gxf, inner_batch, mask_x, mask_y, opts)


def cg_estimator(problem: BilevelProblem, x, y, inner_batch, outer_batch, v, mask_x, mask_y,
                 opts: EstimatorOptions) -> HypergradResult:
  """num_steps conjugate-gradient iterations on H v = grad_y f, from the warm start v."""
  product = PRODUCTS[opts.product]
  xm, ym, gxf, gyf, v0 = _setup(problem, x, y, outer_batch, v, mask_x, mask_y)
  matvec = lambda p: _masked_hv(problem, product, xm, ym, p, inner_batch, mask_y, opts)
  safe_div = lambda a, b: jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), 0.0)

  def it(carry, _):
    vk, r, p, rr = carry
    hp = matvec(p)
    alpha = safe_div(rr, tree.vdot(p, hp))
    vk = tree.axpy(alpha, p, vk)
    r = tree.axpy(-alpha, hp, r)
    rr_new = tree.vdot(r, r)
    p = tree.axpy(safe_div(rr_new, rr), p, r)
    return (vk, r, p, rr_new), None

  r0 = tree.sub(gyf, matvec(v0))
  (v_work, _, _, _), _ = jax.lax.scan(it, (v0, r0, r0, tree.vdot(r0, r0)), None,
                                      length=opts.num_steps)
  return _finish(problem, product, xm, ym, v_work, v, gxf, inner_batch, mask_x, mask_y, opts)


ESTIMATORS: dict[str, Callable[..., HypergradResult]] = {
    "fd": _v_iteration("fd"),
    "exact": _v_iteration("exact"),
    "neumann": neumann_estimator,
    "cg": cg_estimator,
}


def estimator_product_kind(estimator: str, opts: EstimatorOptions) -> str:
  """The product ("fd" or "exact") an estimator evaluates: fd / exact their own, else opts'."""
  return {"fd": "fd", "exact": "exact"}.get(estimator, opts.product)


def estimator_products(estimator: str, opts: EstimatorOptions) -> tuple[int, int]:
  """(H v products, J v products) that one estimate evaluates (the J v call's H v is unused).

  fd, exact : num_steps H v (the fixed step: one per step; the Cauchy step: H v at the warm
              start and H r per step, plus H v again after every projection with a radius)
  neumann   : num_steps - 1 (the series' terms after the first)
  cg        : num_steps + 1 (H v0 for the first residual and one H p per iteration)
  and one J v each: cg evaluates num_steps + 2 products. The one product counter: costs.round_ops
  and costs.grad_evals_per_round count from it.
  """
  n = int(opts.num_steps)
  if estimator in ("fd", "exact"):
    hv = n
    if opts.v_step == "cauchy" and n > 0:
      hv += 1 + (n if opts.radius is not None else 0)
  elif estimator == "neumann":
    hv = max(n - 1, 0)
  else:
    hv = n + 1
  return hv, 1


def validate_options(estimator: str, opts: EstimatorOptions) -> None:
  check_choice("estimator", estimator, ESTIMATORS)
  check_choice("product", opts.product, PRODUCTS)
  check_choice("v_step", opts.v_step, V_STEPS)
  if int(opts.num_steps) != opts.num_steps or opts.num_steps < 0:
    raise ConfigError(f"num_steps={opts.num_steps!r} must be an integer >= 0.")
  if not opts.step_size > 0:
    raise ConfigError(f"step_size={opts.step_size!r} is outside the allowed range (0, inf).")
  if not opts.delta > 0:
    raise ConfigError(f"delta={opts.delta!r} is outside the allowed range (0, inf).")
  if opts.radius is not None and not opts.radius > 0:
    raise ConfigError(f"radius={opts.radius!r} must be None or in (0, inf).")


def hypergradient(problem: BilevelProblem, x: PyTree, y: PyTree, inner_batch: Any,
                  outer_batch: Any, *, estimator: str = "fd", v: PyTree | None = None,
                  mask_x: PyTree | None = None, mask_y: PyTree | None = None,
                  **options: Any) -> HypergradResult:
  """Estimate grad Phi(x) at (x, y) on one client's batches; see the module docstring.

  Args:
    problem: the client's inner and outer losses.
    x, y: outer and inner parameters (PyTrees); y should be close to y*(x).
    inner_batch, outer_batch: the batches g and f are evaluated on.
    estimator: a key of ESTIMATORS.
    v: warm start for the linear-system solution (like y); zeros if None.
    mask_x, mask_y: 0/1 PyTrees like x and y (dual pruning); None keeps everything.
    **options: EstimatorOptions' fields (their meaning and defaults there).
  Returns:
    HypergradResult(hypergrad like x, v like y).
  """
  opts = EstimatorOptions(**options)
  validate_options(estimator, opts)
  return ESTIMATORS[estimator](problem, x, y, inner_batch, outer_batch, v, mask_x, mask_y, opts)
