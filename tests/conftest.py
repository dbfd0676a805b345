"""Test setup: eight fake CPU devices so sharding code paths run for real."""

import os
import sys

# The test programs are tiny and run for a few steps, so the suite compiles them for compile time, not speed:
# without LLVM's optimisation passes (17-20 s -> 10 s for the trainer tests' step on 2 cores, when it had the
# convolutional stem), and with XLA's older elemental emitters for fusions instead of its newer fusion emitters
# (another third off that step's backend compile, 7.0-8.6 s -> 5.0-5.9 s). The same HLO is compiled (XLA's own
# passes all run), without fast-math either way; the code may run slower, which matters only to the few tests that
# run many steps.
# Every process the tests start gets these flags too (tests/distributed.child_env), so that they all share the
# compilation cache below.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                                   "--xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One persistent compilation cache for every program the suite compiles: the xdist workers, the training
# subprocesses and the two-process runs inherit these variables, so a program compiled once (the tiny train step
# on 2 devices, an evaluator's forward pass) is read back everywhere else, in this run and in the next. Small
# programs are cached too (jax's defaults skip those under a second of compile time). CI points the variable at
# a fresh folder; locally it lives in the user's cache folder, so the quick loop starts warm.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sycoca_jax", "jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import collections  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402

# With torch installed, open_clip -> torchvision -> torch._dynamo imports triton. triton's extension segfaults
# when it is loaded after TensorFlow (which clu and tfds import), so load it first whenever it is present.
if importlib.util.find_spec("triton") is not None:
  import triton  # noqa: E402,F401  pylint: disable=unused-import

import numpy.testing  # noqa: E402
import pytest  # noqa: E402


# The longest tests, as --durations measured them on 2 cores (each over 35 s), longest first.
LONGEST_FIRST = ("tests/test_pod.py::", "tests/test_ablation.py::test_study",
                 "tests/test_notebooks.py::test_notebook_runs", "tests/test_train.py::test_sigkill",
                 "tests/test_train.py::test_same_losses", "tests/test_model.py::test_remat_policies",
                 "tests/test_train.py::test_init_from")


# Tests that share an expensive setup of their process (a module fixture, an import): given out test by test, both
# workers would pay for it. Each group runs on one worker (pytest_xdist_make_scheduler).
SAME_WORKER = (("tests/test_open_clip_parity.py::", "torch"),  # torch and open_clip's import, the reference models
               ("tests/test_show_masks.py::test_imported_open_clip", "torch"),
               ("tests/test_init.py::", "test_init"))  # the deep towers' initialisation


def pytest_configure(config):
  # xdist's default hands each worker a quarter of its share of the tests at once, in collection order: one worker
  # would get every long test below. One test at a time keeps both busy to the end.
  if getattr(config.option, "maxschedchunk", 0) is None:
    config.option.maxschedchunk = 1
  # Tests that train or compile for real (subprocesses, several processes, many steps); `-m "not slow"` leaves
  # them out and keeps the inner loop under a minute. Each says why it is slow: @pytest.mark.slow(reason="...").
  config.addinivalue_line("markers", "slow(reason): trains or compiles for real; the reason says what takes long.")


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # before xdist's own
def pytest_xdist_make_scheduler(config, log):
  """xdist's load balancing, except that a test of a SAME_WORKER group takes the rest of its group along."""
  if config.getvalue("dist") != "load":
    return None
  from xdist.scheduler import LoadScheduling  # pylint: disable=g-import-not-at-top

  group_of = lambda nodeid: next((group for prefix, group in SAME_WORKER if nodeid.startswith(prefix)), None)

  class Scheduling(LoadScheduling):

    def _send_tests(self, node, num):
      groups = {group_of(self.collection[i]) for i in self.pending[:num]} - {None}
      tests = self.pending[:num] + [i for i in self.pending[num:] if group_of(self.collection[i]) in groups]
      if tests:
        sent = set(tests)
        self.pending = [i for i in self.pending if i not in sent]
        self.node2pending[node].extend(tests)
        node.send_runtest_some(tests)

  return Scheduling(config, log)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
  # An xdist worker has sent all its reports by now (xdist sends them at session finish). What is left is the
  # interpreter's teardown: thousands of compiled programs, TensorFlow and torch freed one by one, a few seconds
  # per worker on 2 cores with the main process waiting for it. Exit without it.
  if os.environ.get("PYTEST_XDIST_WORKER"):
    for stream in (sys.stdout, sys.stderr):
      stream.flush()
    os._exit(0)


def pytest_collection_modifyitems(config, items):
  unexplained = sorted({item.nodeid.split("[")[0] for item in items
                        if (mark := item.get_closest_marker("slow")) and not mark.kwargs.get("reason")})
  if unexplained:
    raise pytest.UsageError("Mark slow tests with @pytest.mark.slow(reason=...): " + ", ".join(unexplained))
  # Longest first (stable otherwise): the few multi-minute runs, then the other slow tests, then the rest. With
  # xdist handing out one test at a time (pytest_configure), no worker is left to finish a long run alone at the end.
  # A SAME_WORKER group is handed out where its first test stands: put the groups before the other fast tests.
  def rank(item):
    longest = [i for i, prefix in enumerate(LONGEST_FIRST) if item.nodeid.startswith(prefix)]
    if longest:
      return longest[0]
    grouped = any(item.nodeid.startswith(prefix) for prefix, _ in SAME_WORKER)
    return len(LONGEST_FIRST) + (0 if item.get_closest_marker("slow") else 1 if grouped else 2)
  items.sort(key=rank)


# The checks a run passed, printed under the tests' count so that a change which drops some shows: `assert` statements
# (pytest's assertion-pass hook, switched on in pytest.ini) and numpy.testing's comparisons, in the test processes.
# Checks made inside the processes a test starts are not counted.
_checks = collections.Counter()


def _counted(fn):
  @functools.wraps(fn)
  def counted(*args, **kwargs):
    result = fn(*args, **kwargs)
    _checks["numpy.testing"] += 1
    return result
  return counted


for _name in ("assert_allclose", "assert_array_equal", "assert_array_less", "assert_equal",
              "assert_array_almost_equal", "assert_almost_equal", "assert_array_max_ulp"):
  setattr(numpy.testing, _name, _counted(getattr(numpy.testing, _name)))


def pytest_assertion_pass(item, lineno, orig, expl):
  del item, lineno, orig, expl
  _checks["assert"] += 1


def pytest_sessionfinish(session):
  if hasattr(session.config, "workeroutput"):  # an xdist worker: its counts go to the main process with its report
    session.config.workeroutput["checks"] = dict(_checks)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: the main process gathers each worker's counts
def pytest_testnodedown(node, error):
  del error
  _checks.update(getattr(node, "workeroutput", {}).get("checks", {}))


def pytest_terminal_summary(terminalreporter):
  counts = ", ".join(f"{n} {kind}" for kind, n in sorted(_checks.items()))
  terminalreporter.write_line(f"{sum(_checks.values())} checks passed ({counts or 'none'})")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """The workdir of a tiny run trained for 2 steps (tests/helpers.trained_run_config), trained once per test run.

  The xdist workers share it: the first to ask trains it under a file lock, the others wait and read it. Tests
  that change a workdir take their own copy (helpers.copy_run); tests that only read it use it in place.
  """
  import fcntl  # pylint: disable=g-import-not-at-top
  from sycoca_jax import train  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top

  # Under xdist each worker's base folder sits in the run's own folder; without it, the base folder is the run's.
  root = tmp_path_factory.getbasetemp()
  root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
  workdir, done = root / "trained_run", root / "trained_run.done"
  with open(root / "trained_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      train.train_and_evaluate(helpers.trained_run_config(), str(workdir))
      done.touch()
  return workdir
