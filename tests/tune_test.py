"""experiments.tune: the selection rule of the tuning protocol and the flagfile it writes."""

import os
import tempfile

from absl import flags
from absl.testing import absltest, flagsaver

from experiments import tune


def _point(outer, inner, v, acc):
  return dict(outer_lr=outer, inner_lr=inner, v_lr=v, mean_accuracy=acc,
              std_accuracy=None if acc is None else 0.01)


class SelectTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()

  def test_highest_mean_wins_ties_to_smaller_steps_diverged_last(self):
    points = [_point(0.3, 0.1, 0.1, None),  # diverged: never chosen
              _point(0.1, 0.1, 0.1, 0.90), _point(0.03, 0.1, 0.1, 0.90),
              _point(0.03, 0.03, 0.1, 0.90), _point(0.1, 0.03, 0.03, 0.89)]
    self.assertEqual(tune.select(points), points[3])  # tie at 0.90: smallest outer, then inner
    self.assertEqual(tune.select(points[:2] + points[4:]), points[1])

  def test_every_point_diverged_is_a_clear_error(self):
    with self.assertRaises(SystemExit) as e:
      tune.select([_point(0.3, 0.1, 0.1, None)])
    self.assertEqual(e.exception.code, 2)

  def test_the_flagfile_sets_the_chosen_steps(self):
    path = os.path.join(tempfile.mkdtemp(), "p.cfg")
    with flagsaver.flagsaver(algorithm="simfbo", task="hyper_cleaning"):
      tune.write_preset(path, _point(10.0, 0.05, 0.02, 0.88), [0, 1], 12.0)
    with open(path) as f:
      lines = [line.strip() for line in f if not line.startswith("#")]
    self.assertEqual(lines, ["--algorithm=simfbo", "--outer_lr=10", "--inner_lr=0.05",
                             "--v_lr=0.02"])


if __name__ == "__main__":
  absltest.main()
