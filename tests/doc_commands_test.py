"""Every command the docs show runs: README.md, WORKSPACE.md, BENCHMARKS.md and docs/*.md are
parsed at test time, and each `python -m experiments.` command in their code lines runs, cut
short with --smoke (experiments/common.py), in document order in one temporary directory.

What counts as a command: a line of a fenced (```) or indented (4 spaces / tab) code block that
starts with `python -m experiments.` (optionally after `NAME=value` environment assignments such
as `JAX_PLATFORMS=cpu`), or such a segment of a `&&` chain; backslash-continued lines are joined
and `# comments` dropped. Inline `code` in prose is not a command.

How it runs: `python` is this interpreter, `--smoke` is appended, XLA compiles with most
optimisations off (JAX_DISABLE_MOST_OPTIMIZATIONS: compilation dominates a smoke run and only
the exit status is checked; a command's own environment assignments still win), the working
directory is one temporary folder holding a link to experiments/ (so relative --flagfile paths
resolve), and an absolute /tmp/... path in a flag is moved into that folder (nothing is written
outside it). Each command's wall time is printed (pytest -s shows it). Commands run side by side,
one per CPU core (at most 4): a command starts once every earlier command that wrote a workdir it
names (its --workdir, a compare's --workdirs) has ended, so each reads what document order gives.
A compare command must name workdirs that an earlier command of the docs produced. A command
written again word for word (another doc repeating it) runs once, and so does one that differs
from an earlier command only in its --workdir when both start in a new workdir (the same run; its
workdir becomes a link to the earlier one's, so a later compare of it finds the results).

Skipped, by these rules only (each skip is printed):
  * --data_dir: local dataset files the test cannot have;
  * a flag value with an upper-case placeholder (--workdir=W, runs/hr_ALG, --data_dir=DIR);
  * benchmark --compare=REV: needs this repository's git history (the run folder is not a
    checkout; tests/benchmark_test.py runs --compare=HEAD in the checkout).
"""

import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from typing import NamedTuple

import pytest
from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "python -m experiments."
_ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")
_PLACEHOLDER = re.compile(r"(?<![A-Za-z])[A-Z]+(?![a-z])")
TIMEOUT_S = 600


class DocCommand(NamedTuple):
  doc: str  # path relative to the repository
  line: int  # 1-based line of the command's first line
  text: str  # the command as written (continuations joined, comment dropped)

  @property
  def where(self) -> str:
    return f"{self.doc}:{self.line}"


def doc_files(root: str = REPO) -> list[str]:
  """The documents whose commands must run, in the order they run."""
  names = ["README.md", "WORKSPACE.md", "BENCHMARKS.md"]
  docs = os.path.join(root, "docs")
  if os.path.isdir(docs):
    names += sorted(os.path.join("docs", n) for n in os.listdir(docs) if n.endswith(".md"))
  return [n for n in names if os.path.isfile(os.path.join(root, n))]


def _code_lines(text: str):
  """(1-based line number, code line) of fenced and indented code blocks."""
  fenced = False
  for number, line in enumerate(text.splitlines(), 1):
    if line.lstrip().startswith("```"):
      fenced = not fenced
      continue
    if fenced:
      yield number, line.strip()
    elif line.startswith(("    ", "\t")):
      yield number, line.strip()


def _strip_comment(line: str) -> str:
  try:
    return shlex.join(shlex.split(line, comments=True))
  except ValueError:  # an unbalanced quote: keep the line as written, the run will say why
    return line


def extract_commands(text: str, doc: str) -> list[DocCommand]:
  """The `python -m experiments.` commands of one document, in order."""
  commands, lines = [], list(_code_lines(text))
  i = 0
  while i < len(lines):
    number, line = lines[i]
    while line.endswith("\\") and i + 1 < len(lines) and lines[i + 1][0] == lines[i][0] + 1:
      i += 1
      line = line[:-1].rstrip() + " " + lines[i][1]
    i += 1
    for segment in line.split("&&"):
      words = _strip_comment(segment.strip()).split(" ")
      while words and _ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
      if " ".join(words).startswith(PREFIX):
        commands.append(DocCommand(doc, number, _strip_comment(segment.strip())))
  return commands


def all_commands(root: str = REPO) -> list[DocCommand]:
  out = []
  for name in doc_files(root):
    with open(os.path.join(root, name), encoding="utf-8") as f:
      out += extract_commands(f.read(), name)
  return out


def skip_reason(command: DocCommand) -> str | None:
  for word in shlex.split(command.text):
    if word.startswith("--data_dir"):
      return "needs local dataset files (--data_dir)"
    if word.startswith("--compare="):
      return "needs the git history (--compare)"
    if word.startswith("--") and "=" in word and _PLACEHOLDER.search(word.split("=", 1)[1]):
      return f"placeholder in {word}"
  return None


def to_argv(command: DocCommand, tmp: str) -> tuple[dict[str, str], list[str]]:
  """(extra environment, argv) to run the command in tmp with --smoke."""
  words = shlex.split(command.text)
  env = {}
  while _ENV_ASSIGNMENT.match(words[0]):
    key, value = words.pop(0).split("=", 1)
    env[key] = value
  assert words[0] == "python", command
  argv = [sys.executable] + [re.sub(r"=/tmp/", f"={tmp}/_tmp/", w) for w in words[1:]]
  return env, argv + ["--smoke"]


def same_run_key(command: DocCommand) -> tuple[str, ...]:
  """The command's words without its --workdir: two commands with one key are the same run."""
  return tuple(w for w in shlex.split(command.text) if not w.startswith("--workdir="))


def _flag(argv: list[str], name: str) -> str | None:
  for word in argv:
    if word.startswith(f"--{name}="):
      return word.split("=", 1)[1]
  return None


class Step(NamedTuple):
  command: DocCommand
  note: str | None  # why it does not run (a repeat, a skip); None: it runs
  extra_env: dict[str, str]
  argv: list[str]
  after: tuple[int, ...]  # indices of the earlier steps it waits for
  link: tuple[str, str] | None  # (workdir, the earlier workdir it stands for)


def plan(commands: list[DocCommand], tmp: str) -> list[Step]:
  """Document order made explicit: what runs, and after which earlier runs (see the docstring)."""
  steps, done, writer = [], {}, {}  # writer: workdir -> index of the last step that wrote it
  for command in commands:
    skip = lambda note, link=None: steps.append(Step(command, note, {}, [], (), link))
    if command.text in done:  # the same command again: the same result (or a resume)
      skip(f"ran already as {done[command.text][0]}")
      continue
    reason = skip_reason(command)
    if reason:
      done[command.text] = (command.where, None)
      skip(f"skipped: {reason}")
      continue
    extra_env, argv = to_argv(command, tmp)
    workdir = _flag(argv, "workdir")
    fresh = workdir is not None and workdir not in writer
    same_run = same_run_key(command)
    if fresh and same_run in done:  # a fresh run of an earlier fresh run: link to its workdir
      where, earlier = done[same_run]
      writer[workdir] = writer[earlier]
      done[command.text] = (where, earlier)
      skip(f"ran already as {where} (another --workdir)", (workdir, earlier))
      continue
    done[command.text] = (command.where, workdir)
    if fresh:  # a run into an existing workdir (a resume) stands for no other
      done[same_run] = (command.where, workdir)
    reads = [workdir] + (_flag(argv, "workdirs") or "").split(",")
    after = tuple(sorted({writer[w] for w in reads if w in writer}))
    if workdir is not None:
      writer[workdir] = len(steps)
    steps.append(Step(command, None, extra_env, argv, after, None))
  return steps


class ExtractionTest(absltest.TestCase):
  """Cheap: the parser finds the README's main commands (a reformat that hides them fails)."""

  def test_readme_shows_each_task_driver(self):
    readme = [c for c in all_commands() if c.doc == "README.md"]
    modules = {c.text.split(PREFIX)[1].split()[0] for c in readme}
    for module in ("hyper_representation", "hyper_cleaning", "compare", "coverage_rate"):
      self.assertIn(module, modules, f"README.md shows no `{PREFIX}{module}` command")

  def test_benchmark_command_is_documented(self):
    modules = {c.text.split(PREFIX)[1].split()[0] for c in all_commands()}
    self.assertIn("benchmark", modules)

  def test_parser_rules(self):
    text = "\n".join([
        "Prose `python -m experiments.inline --x=1` is not a command.",
        "",
        "    python -m experiments.a --workdir=runs/a   # comment",
        "    pip install -e . && JAX_PLATFORMS=cpu python -m experiments.b --q \\",
        "        --workdir=runs/b",
        "```",
        "python -m experiments.c --workdir=runs/c",
        "python -m pytest",
        "```",
        "python -m experiments.d  (not code)",
    ])
    got = extract_commands(text, "x.md")
    self.assertEqual([(c.line, c.text) for c in got], [
        (3, "python -m experiments.a --workdir=runs/a"),
        (4, "JAX_PLATFORMS=cpu python -m experiments.b --q --workdir=runs/b"),
        (7, "python -m experiments.c --workdir=runs/c")])
    env, argv = to_argv(got[1], "/T")
    self.assertEqual(env, {"JAX_PLATFORMS": "cpu"})
    self.assertEqual(argv, [sys.executable, "-m", "experiments.b", "--q", "--workdir=runs/b",
                            "--smoke"])
    self.assertIn("=/T/_tmp/cov", to_argv(DocCommand("x", 1, "python -m experiments.c "
                                                     "--workdir=/tmp/cov"), "/T")[1][3])

  def test_same_run_rule(self):
    key = lambda text: same_run_key(DocCommand("x", 1, text))
    self.assertEqual(key("python -m experiments.a --q --workdir=runs/a"),
                     key("python -m experiments.a --q --workdir=/tmp/b"))
    self.assertNotEqual(key("python -m experiments.a --q --workdir=runs/a"),
                        key("python -m experiments.a --workdir=runs/a"))
    self.assertNotEqual(key("X=1 python -m experiments.a --workdir=runs/a"),
                        key("python -m experiments.a --workdir=runs/a"))

  def test_skip_rules(self):
    for text, skipped in (("python -m experiments.a --workdir=W", True),
                          ("python -m experiments.benchmark --compare=HEAD~1 --workdir=runs/c",
                           True),
                          ("python -m experiments.a --workdir=runs/hr_ALG", True),
                          ("python -m experiments.a --dataset=mnist --data_dir=~/d", True),
                          ("python -m experiments.a --workdir=runs/hr --keep_ratios=1,0.5", False),
                          ("python -m experiments.a --flagfile=experiments/presets/x.cfg", False)):
      self.assertEqual(skip_reason(DocCommand("x", 1, text)) is not None, skipped, text)


def python_examples(doc: str = "README.md") -> list[str]:
  """The ```python blocks of a document that use the algorithms API, as written."""
  with open(os.path.join(REPO, doc), encoding="utf-8") as f:
    blocks = re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)
  return [b for b in blocks if "bilevel.algorithms.get" in b]


class PlanTest(absltest.TestCase):
  """Cheap: which documented commands run, and which earlier runs each waits for."""

  def test_runs_wait_for_the_workdirs_they_name(self):
    texts = ["python -m experiments.a --workdir=runs/a",
             "python -m experiments.b --workdir=runs/b",
             "python -m experiments.compare --workdirs=runs/a,runs/b --workdir=runs/c",
             "python -m experiments.a --workdir=runs/a",  # written again: runs once
             "python -m experiments.a --workdir=runs/a2",  # a fresh run of a: a link to runs/a
             "python -m experiments.compare --workdirs=runs/a2 --workdir=runs/d",
             "python -m experiments.b --rounds=3 --workdir=runs/b",  # a resume of b
             "python -m experiments.a --workdir=W"]  # a placeholder: skipped
    steps = plan([DocCommand("x.md", i + 1, t) for i, t in enumerate(texts)], "/T")
    self.assertEqual([s.note is None for s in steps],
                     [True, True, True, False, False, True, True, False])
    self.assertEqual([s.after for s in steps if s.note is None], [(), (), (0, 1), (0,), (1,)])
    self.assertEqual(steps[4].link, ("runs/a2", "runs/a"))
    self.assertEqual(steps[0].argv[-1], "--smoke")


@pytest.mark.slow
class ReadmeExampleTest(absltest.TestCase):
  """The README's user example runs as written (a fresh interpreter, nothing added)."""

  def test_user_example_runs_and_prints_finite_metrics(self):
    examples = python_examples()
    self.assertLen(examples, 1, "README.md should show one bilevel.algorithms example")
    proc = subprocess.run([sys.executable, "-c", examples[0]], cwd=REPO, capture_output=True,
                          text=True, timeout=TIMEOUT_S,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    outer_loss, coverage_x_min, hypergrad_norm = map(float, proc.stdout.split())
    self.assertTrue(all(map(math.isfinite, (outer_loss, hypergrad_norm))), proc.stdout)
    # Seed 0, round 20: every x coordinate held by 2 of the 4 sampled clients (an integer count).
    self.assertEqual(coverage_x_min, 2)


@pytest.mark.slow
class DocCommandsTest(absltest.TestCase):

  def test_every_documented_command_runs(self):
    commands = all_commands()
    self.assertNotEmpty(commands)
    with tempfile.TemporaryDirectory() as tmp:
      os.symlink(os.path.join(REPO, "experiments"), os.path.join(tmp, "experiments"))
      env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
                 JAX_DISABLE_MOST_OPTIMIZATIONS="true")
      steps = plan(commands, tmp)
      runs: dict[int, futures.Future] = {}

      def run(step: Step) -> str | None:  # the failure, or None
        for i in step.after:  # the earlier runs whose workdirs it names
          runs[i].result()
        if step.argv[2] == "experiments.compare":
          missing = [w for w in (_flag(step.argv, "workdirs") or "").split(",")
                     if w and not os.path.isfile(os.path.join(tmp, w, "summary.json"))]
          if missing:
            return (f"{step.command.where}: `{step.command.text}` compares {missing}, which no "
                    "earlier command of the docs produced")
        start = time.perf_counter()
        try:
          proc = subprocess.run(step.argv, cwd=tmp, env=dict(env, **step.extra_env),
                                capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
          return f"{step.command.where}: `{step.command.text}` ran past {TIMEOUT_S} s with --smoke"
        print(f"{step.command.where}: {time.perf_counter() - start:.1f} s", flush=True)
        if proc.returncode != 0:
          return (f"{step.command.where}: `{step.command.text}` exited {proc.returncode}:\n"
                  f"{proc.stderr[-1500:]}")
        return None

      with futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        for i, step in enumerate(steps):  # submitted in document order: a step waits only for
          if step.link:                   # earlier ones, which the pool started before it
            workdir, earlier = step.link
            os.makedirs(os.path.dirname(os.path.join(tmp, workdir)), exist_ok=True)
            os.symlink(os.path.join(tmp, earlier), os.path.join(tmp, workdir))
          if step.note:
            print(f"{step.command.where}: {step.note}: {step.command.text}")
          else:
            runs[i] = pool.submit(run, step)
        failures = [f for f in (r.result() for r in runs.values()) if f]
    self.assertEmpty(failures, "\n\n".join(failures))
    self.assertNotEmpty(runs)


if __name__ == "__main__":
  absltest.main()
