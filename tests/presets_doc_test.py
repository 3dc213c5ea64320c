"""docs/method.md, section 7, table "Resolved configuration of each algorithm", against the code.

The table is parsed at test time (found by its heading) and every cell is compared with what
`bilevel.algorithms.get(name, problem=..., num_clients=M)` resolves (`Algorithm.options`,
`Algorithm.options`, `Algorithm.optimizer`) with no keyword but the ones a column needs to be
observable (`levels=` for the pruning column, several M for the participation column, and
`granularity="element"` because the default "unit" needs a model layout). The rows must be
exactly `names()`. The paragraph under the table states what every other option defaults to;
each `field=value` it states is checked too, every other option that could tell algorithms apart
must be stated or be a column, and a column must distinguish at least two algorithms.

The checker is itself tested: swapping a cell for another row's value, or changing a preset in
the code (bilevel.algorithms._SPECS, patched for the test only), must make it report mismatches.
"""

from __future__ import annotations

import ast
import math
import os
import re
from typing import Any, Callable, NamedTuple
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest

import bilevel
from bilevel import algorithms, masks, models
from bilevel.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "method.md")
HEADING = "### Resolved configuration of each algorithm"
PROFILE = "1/1:0.5,0.5/0.5:0.5"  # two levels: shows whether an algorithm honours `levels`
POPULATIONS = (1, 2, 7, 20)  # M values the participation column is checked at
PROBLEM = bilevel.BilevelProblem(lambda x, y, b: jnp.sum(x) * 0.0,
                                 lambda x, y, b: jnp.sum(y) * 0.0)


# ------------------------------------------------------------------------------ the document


class Table(NamedTuple):
  columns: list[str]  # header cells, first = "algorithm"
  rows: dict[str, dict[str, str]]  # algorithm name -> column -> cell text
  after: str  # the prose between the table and the next heading


def _cells(line: str) -> list[str]:
  return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_table(text: str) -> Table:
  """The first Markdown table under HEADING (up to the next heading)."""
  lines = text.splitlines()
  starts = [i for i, line in enumerate(lines) if line.strip() == HEADING]
  assert len(starts) == 1, (f"docs/method.md must have exactly one heading {HEADING!r} "
                            f"(section 7); found {len(starts)}.")
  section = []
  for line in lines[starts[0] + 1:]:
    if line.startswith("#"):
      break
    section.append(line)
  table_at = [i for i, line in enumerate(section) if line.lstrip().startswith("|")]
  assert table_at, f"no Markdown table under {HEADING!r} in docs/method.md."
  first = table_at[0]
  last = first
  while last + 1 < len(section) and section[last + 1].lstrip().startswith("|"):
    last += 1
  header, rule, *body = section[first:last + 1]
  columns = _cells(header)
  assert columns[0] == "algorithm", f"the table's first column must be 'algorithm': {columns}"
  assert all(c and set(c) <= set(":-") for c in _cells(rule)), (
      f"the table's second line is not a header rule: {rule!r}")
  rows: dict[str, dict[str, str]] = {}
  for line in body:
    cells = _cells(line)
    assert len(cells) == len(columns), (
        f"row {line!r} has {len(cells)} cells, the header {len(columns)}.")
    name = cells[0].strip("`")
    assert name not in rows, f"algorithm {name!r} has two rows in the table."
    rows[name] = dict(zip(columns[1:], cells[1:]))
  return Table(columns, rows, "\n".join(section[last + 1:]))


def doc_table() -> Table:
  with open(DOC, encoding="utf-8") as f:
    return parse_table(f.read())


# ------------------------------------------------------------------------------ the code


def build(name: str, num_clients: int = 20, **options: Any) -> algorithms.Algorithm:
  return algorithms.get(name, problem=PROBLEM, num_clients=num_clients, granularity="element",
                        **options)


# A column: (what the cell is parsed into, the resolved value it is compared with).
Check = Callable[[str, str], list[str]]  # (algorithm name, cell) -> mismatches


def _int(cell: str) -> int:
  value = ast.literal_eval(cell.strip("`"))
  if not isinstance(value, int) or isinstance(value, bool):
    raise ValueError(f"{cell!r} is not an integer")
  return value


def _float(cell: str) -> float:
  return float(ast.literal_eval(cell.strip("`")))


def _code(cell: str) -> str:
  if not re.fullmatch(r"`[^`]+`", cell):
    raise ValueError(f"{cell!r} is not one `code` value")
  return cell.strip("`")


def _scalar(parse: Callable[[str], Any], resolve: Callable[[algorithms.Algorithm], Any]) -> Check:
  def check(name: str, cell: str) -> list[str]:
    try:
      documented = parse(cell)
    except (ValueError, SyntaxError) as e:
      return [f"cannot read the cell: {e}"]
    actual = resolve(build(name))
    same = (math.isclose(documented, actual, rel_tol=1e-12) if isinstance(documented, float)
            else documented == actual)
    return [] if same else [f"documented {cell!r}, the code resolves {actual!r}"]
  return check


def _vocabulary(meanings: dict[str, Callable[[str], list[str]]]) -> Check:
  """A column whose cells are one of a few phrases, each a claim checked on the code."""
  def check(name: str, cell: str) -> list[str]:
    if cell not in meanings:
      return [f"unknown value {cell!r}; this column's values are {sorted(meanings)}"]
    return meanings[cell](name)
  return check


def _levels_honoured(name: str) -> list[str]:
  got = build(name, levels=PROFILE).options.levels
  return [] if got == masks.parse_levels(PROFILE) else [
      f"levels={PROFILE!r} resolves to {got}, not the profile"]


def _full_model(name: str) -> list[str]:
  got = build(name, levels=PROFILE).options.levels
  return [] if got == (algorithms.FULL_LEVEL,) else [
      f"levels={PROFILE!r} resolves to {got}, not the single full level 1/1:1"]


def _participation(rule: Callable[[int], int]) -> Callable[[str], list[str]]:
  def check(name: str) -> list[str]:
    return [f"M={m}: clients_per_round is {build(name, num_clients=m).options.clients_per_round}, "
            f"the documented rule gives {rule(m)}"
            for m in POPULATIONS if build(name, num_clients=m).options.clients_per_round != rule(m)]
  return check


def _only_full(expected: bool) -> Callable[[str], list[str]]:
  def check(name: str) -> list[str]:
    got = build(name).spec.only_full
    return [] if got == expected else [f"spec.only_full is {got}"]
  return check


COLUMNS: dict[str, Check] = {
    "K": _scalar(_int, lambda a: a.options.local_steps),
    "T": _scalar(_int, lambda a: a.options.inner_steps),
    "estimator": _scalar(_code, lambda a: a.options.estimator),
    "N": _scalar(_int, lambda a: a.options.num_steps),
    "beta": _scalar(_float, lambda a: a.options.inner_lr),
    "alpha": _scalar(_float, lambda a: a.options.outer_lr),
    "eta": _scalar(_float, lambda a: a.options.v_lr),
    "mask policy": _scalar(_code, lambda a: a.options.mask_policy),
    "pruning": _vocabulary({"levels honoured": _levels_honoured,
                            "none (full model)": _full_model}),
    "clients per round C": _vocabulary({"M": _participation(lambda m: m),
                                        "max(1, M // 2)": _participation(lambda m: max(1, m // 2))}),
    "who trains": _vocabulary({"every sampled client": _only_full(False),
                               "level-1/1 clients only": _only_full(True)}),
    "round": _scalar(_code, lambda a: a.spec.round_kind),
}
# The Options fields (and config fields) the columns cover.
COVERED = {"local_steps", "inner_steps", "estimator", "num_steps", "inner_lr", "outer_lr", "v_lr",
           "mask_policy", "levels", "clients_per_round"}
# Depends on `layout` rather than on the algorithm alone; stated in words, checked separately.
GRANULARITY = "granularity"


def mismatches(table: Table) -> list[str]:
  """Every disagreement between the table and the code, as readable lines."""
  out = []
  missing = set(algorithms.names()) - set(table.rows)
  extra = set(table.rows) - set(algorithms.names())
  if missing:
    out.append(f"rows missing for algorithm(s) {sorted(missing)} (names() = {algorithms.names()})")
  if extra:
    out.append(f"rows for unknown algorithm(s) {sorted(extra)} (names() = {algorithms.names()})")
  unknown = [c for c in table.columns[1:] if c not in COLUMNS]
  absent = [c for c in COLUMNS if c not in table.columns]
  if unknown:
    out.append(f"columns the test cannot check: {unknown} (known: {list(COLUMNS)})")
  if absent:
    out.append(f"columns missing from the table: {absent}")
  for name in algorithms.names():
    if name not in table.rows:
      continue
    for column, check in COLUMNS.items():
      if column in table.rows[name]:
        out += [f"{name}, column {column!r}: {m}" for m in check(name, table.rows[name][column])]
  return out


# ------------------------------------------------------------------------------ the tests


def test_table_matches_resolved_configuration():
  problems = mismatches(doc_table())
  assert not problems, ("docs/method.md, '" + HEADING.lstrip("# ") + "', disagrees with "
                        "bilevel.algorithms:\n  " + "\n  ".join(problems))


def test_rows_are_exactly_the_algorithm_names():
  assert set(doc_table().rows) == set(algorithms.names())


def test_every_column_distinguishes_algorithms():
  table = doc_table()
  for column in table.columns[1:]:
    values = {row[column] for row in table.rows.values()}
    assert len(values) > 1, f"column {column!r} is the same for every algorithm: state it under "\
                            "the table instead"


def _stated_defaults(after: str) -> dict[str, str]:
  """`field=value` pairs of the paragraph under the table (not `--flag=value`)."""
  return dict(re.findall(r"`([a-z_]+)=([^`]+)`", after))


def test_remaining_options_are_shared_and_stated():
  table = doc_table()
  stated = _stated_defaults(table.after)
  assert stated, "the paragraph under the table states no `field=value` defaults"
  fields = set(algorithms.Options._fields)
  assert set(stated) <= fields, f"stated defaults that are not options: {set(stated) - fields}"
  built = {name: build(name) for name in algorithms.names()}
  for field, text in stated.items():
    value = ast.literal_eval(text)
    if field == "levels":  # resolved into a tuple of masks.Level
      value = masks.parse_levels(value)
    for name, alg in built.items():
      assert getattr(alg.options, field) == value, (
          f"{name}: {field} resolves to {getattr(alg.options, field)!r}; the doc states {text}")
  reference = built[algorithms.names()[0]].options
  for field in fields - COVERED - {GRANULARITY}:
    for name, alg in built.items():
      assert getattr(alg.options, field) is getattr(reference, field) or (
          getattr(alg.options, field) == getattr(reference, field)), (
              f"option {field} differs between algorithms ({name}: {getattr(alg.options, field)!r})"
              f": it needs a column in the table")
    value = getattr(reference, field)
    if value is not None and not callable(value):
      assert field in stated, f"option {field} (= {value!r}) is neither a column nor stated"


def test_server_optimiser_is_sgd_at_server_lr():
  g = {"w": jnp.array([1.0, -2.0, 0.5])}
  for name in algorithms.names():
    alg = build(name)
    assert alg.options.server_optimizer is None
    updates, _ = alg.optimizer.update(g, alg.optimizer.init(g), g)
    np.testing.assert_allclose(updates["w"], -alg.options.server_lr * g["w"], err_msg=name)


def test_granularity_as_stated():
  """'granularity `unit` (it needs a `layout`; full-model algorithms without one use `element`)'."""
  after = doc_table().after
  assert "granularity `unit`" in after and "use `element`" in after
  layout = models.mlp_layout(4)
  for name in algorithms.names():
    with_layout = algorithms.get(name, problem=PROBLEM, num_clients=4, layout=layout)
    assert with_layout.options.granularity == "unit", name
    full_model = build(name, levels=PROFILE).options.levels == (algorithms.FULL_LEVEL,)
    if full_model:
      assert algorithms.get(name, problem=PROBLEM, num_clients=4).options.granularity == \
          "element", name
    else:
      with pytest.raises(ConfigError, match="layout"):
        algorithms.get(name, problem=PROBLEM, num_clients=4)


# ------------------------------------------------------------------------------ the checker


def test_checker_reports_a_changed_cell():
  """Giving a row another row's (valid) value in any column is reported."""
  table = doc_table()
  assert not mismatches(table)
  for column in table.columns[1:]:
    pairs = [(a, b) for a in table.rows for b in table.rows
             if table.rows[a][column] != table.rows[b][column]]
    a, b = pairs[0]
    rows = {n: dict(r) for n, r in table.rows.items()}
    rows[a][column] = table.rows[b][column]
    found = mismatches(table._replace(rows=rows))
    assert any(f"{a}, column {column!r}" in m for m in found), (column, found)


def test_checker_reports_a_missing_row_and_column():
  table = doc_table()
  rows = dict(table.rows)
  del rows["fedrolex"]
  assert any("fedrolex" in m and "missing" in m for m in mismatches(table._replace(rows=rows)))
  cut = table._replace(columns=table.columns[:-1])
  assert any("missing from the table" in m for m in mismatches(cut))
  with pytest.raises(AssertionError, match="exactly one heading"):
    parse_table("# nothing here\n")


@pytest.mark.parametrize("change", [
    dict(local_steps=4), dict(inner_steps=2), dict(estimator="cg"), dict(num_steps=3),
    dict(inner_lr=0.05), dict(outer_lr=0.05), dict(v_lr=0.05), dict(mask_policy="magnitude")])
def test_checker_reports_a_changed_preset(change):
  """A preset changed in the code (here rafbo's defaults, patched for this test) is reported."""
  spec = algorithms._SPECS["rafbo"]
  patched = spec._replace(defaults=spec.defaults._replace(**change))
  with mock.patch.dict(algorithms._SPECS, {"rafbo": patched}):
    found = mismatches(doc_table())
  assert found and all(m.startswith("rafbo") for m in found), found


def test_checker_reports_changed_participation_pruning_and_round():
  spec = algorithms._SPECS["rafbo"]
  for field in ("full_participation", "full_model", "only_full"):
    with mock.patch.dict(algorithms._SPECS, {"rafbo": spec._replace(**{field: True})}):
      assert any(m.startswith("rafbo") for m in mismatches(doc_table())), field
  fednest = algorithms._SPECS["fednest"]
  with mock.patch.dict(algorithms._SPECS, {"fednest": fednest._replace(round_kind="local")}):
    assert any(m.startswith("fednest, column 'round'") for m in mismatches(doc_table()))
