"""experiments.tune: the selection rule of the tuning protocol and the flagfile it writes."""

import json
import os
import tempfile
from unittest import mock

from absl import flags
from absl.testing import absltest, flagsaver

from bilevel import algorithms
from experiments import tune


def _point(outer, inner, v, acc):
  return dict(outer_lr=outer, inner_lr=inner, v_lr=v, mean_accuracy=acc,
              std_accuracy=None if acc is None else 0.01)


class SelectTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()

  def test_smallest_steps_within_one_standard_error_of_the_best(self):
    # std 0.01 over 2 seeds: standard error 0.0071, so the bar is 0.92 - 0.0071 = 0.9129.
    points = [_point(0.3, 0.1, 0.1, 0.92), _point(0.1, 0.1, 0.1, 0.915),
              _point(0.03, 0.1, 0.1, 0.90)]
    self.assertEqual(tune.select(points, 2), points[1])  # 0.90 is outside the bar
    self.assertEqual(tune.select(points, 1000), points[0])  # SE 0.0003: only the best
    self.assertEqual(tune.select(points[:1] + points[2:], 2), points[0])

  def test_ties_to_smaller_steps_diverged_never(self):
    points = [_point(0.3, 0.1, 0.1, None),  # diverged: never chosen
              _point(0.1, 0.1, 0.1, 0.90), _point(0.03, 0.1, 0.1, 0.90),
              _point(0.03, 0.03, 0.1, 0.90), _point(0.1, 0.03, 0.03, 0.89)]
    self.assertEqual(tune.select(points, 2), points[3])  # tie at 0.90: smallest outer, then inner
    self.assertEqual(tune.select(points[:2] + points[4:], 2), points[1])

  def test_a_finished_point_is_reused_only_with_the_same_seeds_and_steps(self):
    pdir = tempfile.mkdtemp()
    os.makedirs(os.path.join(pdir, "seed_0"))
    with open(os.path.join(pdir, "seed_0", "config.json"), "w") as f:
      json.dump({"flags": {"outer_lr": 0.1, "inner_lr": 0.03, "v_lr": 0.1}}, f)
    values = dict(outer_lr=0.1, inner_lr=0.03, v_lr=0.1)
    self.assertIsNone(tune.finished_point(pdir, [0, 1], values))  # no summary: not finished
    with open(os.path.join(pdir, "summary.json"), "w") as f:
      json.dump({"seeds": [0, 1], "mean": {"test_accuracy": 0.9}, "std": {"test_accuracy": 0.01},
                 "per_seed": {"0": {"test_accuracy": 0.89}, "1": {"test_accuracy": 0.91}}}, f)
    point = tune.finished_point(pdir, [0, 1], values)
    self.assertEqual((point["mean_accuracy"], point["std_accuracy"]), (0.9, 0.01))
    self.assertIsNone(tune.finished_point(pdir, [0, 2], values))
    self.assertIsNone(tune.finished_point(pdir, [0, 1], dict(values, v_lr=0.03)))

  def test_a_point_scores_its_worst_partition_and_the_flagfile_sets_the_chosen_steps(self):
    workdir, calls = tempfile.mkdtemp(), []

    def fake_run_point(path, seeds, values):  # holds on IID; outer_lr 30 diverges on label skew
      calls.append((os.path.relpath(path, workdir), seeds, values))
      if values["partition"] == "iid":
        return dict(values, mean_accuracy=0.95, std_accuracy=0.001, error=None, seconds=1.0)
      if values["outer_lr"] == 30:
        return dict(values, mean_accuracy=None, std_accuracy=None, error="diverged", seconds=1.0)
      return dict(values, mean_accuracy=0.8 + values["inner_lr"] + values["v_lr"],
                  std_accuracy=0.001, error=None, seconds=1.0)

    preset = os.path.join(workdir, "p.cfg")
    with flagsaver.flagsaver(algorithm="simfbo", task="hyper_cleaning", workdir=workdir,
                             preset_out=preset, tune_partitions=["iid", "dirichlet:0.1"]), \
        mock.patch.object(tune, "run_point", fake_run_point):
      tune.main(["tune"])
    self.assertLen(calls, 16)  # 8 grid points x 2 partitions
    self.assertIn((os.path.join("point_outer_lr10_inner_lr0.02_v_lr0.05", "dirichlet0.1"), [0, 1],
                   dict(outer_lr=10.0, inner_lr=0.02, v_lr=0.05, partition="dirichlet", alpha=0.1)),
                  calls)
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    for p in summary["points"]:
      self.assertEqual(p["worst_partition"], "dirichlet0.1")
      self.assertEqual(p["seconds"], 2.0)
      self.assertEqual(set(p["per_partition"]), {"iid", "dirichlet0.1"})
      if p["outer_lr"] == 30:  # never chosen
        self.assertEqual((p["mean_accuracy"], p["error"]), (None, "diverged"))
      else:
        self.assertAlmostEqual(p["mean_accuracy"], 0.8 + p["inner_lr"] + p["v_lr"])
    self.assertEqual(summary["best"], dict(outer_lr=10.0, inner_lr=0.05, v_lr=0.05))
    self.assertEqual(summary["cost_s"], 16.0)
    with open(preset) as f:
      text = f.read()
    self.assertIn("held-out accuracy 0.9000 +- 0.0010 (dirichlet0.1); tuning cost 16 s.", text)
    lines = [line.strip() for line in text.splitlines() if not line.startswith("#")]
    self.assertEqual(lines, ["--algorithm=simfbo", "--outer_lr=10", "--inner_lr=0.05",
                             "--v_lr=0.05"])

  def test_partitions_flag(self):
    with flagsaver.flagsaver(tune_partitions=["iid", "dirichlet:0.1", "shards"]):
      self.assertEqual(tune.partitions(), {
          "iid": dict(partition="iid"), "dirichlet0.1": dict(partition="dirichlet", alpha=0.1),
          "shards": dict(partition="shards")})
    for bad in (["dirichlet"], ["dirichlet:-1"], ["pathological"], []):
      with flagsaver.flagsaver(tune_partitions=bad), self.assertRaises(SystemExit):
        tune.partitions()

  def test_fednest_and_a_bad_grid_are_refused(self):
    for bad in (dict(algorithm="fednest"), dict(grid_outer_lr=["0.1", "fast"])):
      with flagsaver.flagsaver(workdir=tempfile.mkdtemp(), **bad), \
          self.assertRaises(SystemExit) as e:
        tune.main(["tune"])
      self.assertEqual(e.exception.code, 2)

  def test_every_point_diverged_is_a_clear_error(self):
    with self.assertRaises(SystemExit) as e:
      tune.select([_point(0.3, 0.1, 0.1, None)], 2)
    self.assertEqual(e.exception.code, 2)

if __name__ == "__main__":
  absltest.main()


class TunedPresetsTest(absltest.TestCase):
  """The README tables' flagfiles: one per task and algorithm, written by tune, on its grid."""

  def test_every_algorithm_has_a_tuned_preset_on_the_task_grid(self):
    for task, grid in tune.GRIDS.items():
      for name in algorithms.names():
        path = os.path.join(tune.PRESETS_DIR, f"{task}_{name}.cfg")
        self.assertTrue(os.path.isfile(path), f"no tuned preset {path}")
        with open(path) as f:
          text = f.read()
        if name == "fednest":  # not tuned: FedNest's own hyperparameters (one step hlr)
          self.assertTrue(text.startswith("# FedNest's own hyperparameters, not tuned"), path)
          values = dict(line[2:].split("=", 1) for line in text.splitlines()
                        if line.startswith("--"))
          self.assertEqual(values, dict(algorithm="fednest", outer_lr="0.01", inner_lr="0.01",
                                        inner_steps="5", num_steps="6", local_steps="1",
                                        batch_size="64"), path)
          continue
        self.assertIn(f"# Tuned by experiments.tune for --task={task} --algorithm={name}:", text)
        values = dict(line[2:].split("=", 1) for line in text.splitlines()
                      if line.startswith("--"))
        self.assertEqual(set(values), {"algorithm", "outer_lr", "inner_lr", "v_lr"}, path)
        self.assertEqual(values["algorithm"], name)
        for step in ("outer_lr", "inner_lr", "v_lr"):
          self.assertIn(float(values[step]), grid[step], f"{path}: --{step} off the grid")


def _flagfile_steps(path):
  """(outer, inner, v) a flagfile sets; v follows outer where it is not set (fednest's one hlr)."""
  values = dict(line[2:].strip().split("=", 1) for line in open(path)
                if line.startswith("--") and "=" in line)
  outer = float(values["outer_lr"])
  return outer, float(values["inner_lr"]), float(values.get("v_lr", outer))


def readme_step_rows(text):
  """[(task, algorithm, (outer, inner, v))] of every README table with a 'steps (outer, inner,
  v)' column; the task is that of the section heading above the table (task 2's heading names
  hyper-cleaning, every other section is task 1)."""
  rows, task, column = [], "hyper_representation", None
  for line in text.splitlines():
    if line.startswith("#"):
      task = "hyper_cleaning" if "hyper-cleaning" in line.lower() else "hyper_representation"
      column = None
    elif line.startswith("|"):
      cells = [c.strip() for c in line.strip("|").split("|")]
      if column is None:
        column = next((i for i, c in enumerate(cells) if "steps (outer, inner, v)" in c), None)
      elif column is not None and not set(cells[0]) <= set("-: "):
        name = cells[0].split()[0].rstrip(",")
        steps = tuple(float(v) for v in cells[column].split("(")[0].split(","))
        rows.append((task, name, steps))
    else:
      column = None
  return rows


class ReadmeStepsTest(absltest.TestCase):
  """The README's result tables state the steps of the flagfiles their commands pass."""

  def test_every_row_states_its_flagfiles_steps(self):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = readme_step_rows(open(os.path.join(root, "README.md")).read())
    self.assertGreaterEqual(len({(t, a) for t, a, _ in rows}), 18)  # both tasks, every algorithm
    for task, name, steps in rows:
      with self.subTest(task=task, algorithm=name):
        path = os.path.join(tune.PRESETS_DIR, f"{task}_{name}.cfg")
        self.assertEqual(steps, _flagfile_steps(path))

  def test_a_changed_step_is_reported(self):
    text = ("### Task 2: federated data hyper-cleaning\n"
            "| algorithm | tuned steps (outer, inner, v) |\n|---|---|\n| rafbo (pruned) | 1, 2, 3 |\n")
    self.assertEqual(readme_step_rows(text), [("hyper_cleaning", "rafbo", (1.0, 2.0, 3.0))])
    self.assertNotEqual(readme_step_rows(text)[0][2], _flagfile_steps(
        os.path.join(tune.PRESETS_DIR, "hyper_cleaning_rafbo.cfg")))
