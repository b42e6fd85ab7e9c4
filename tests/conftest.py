"""Test-session set-up for every test file.

* One persistent XLA compilation cache for the whole session: the pytest-xdist controller picks a fresh folder
  and every worker, and every subprocess they start (train.py, sample.py, two-process runs), inherits it through
  the environment, so a program compiles once per session wherever it runs first.
* The slowest test files run first (SLOW_FIRST): pytest-xdist hands work out in collection order, and a long
  test started last keeps one core busy after the other has finished.
* One thread for the PyTorch references (OMP_NUM_THREADS=1, unless set): with two xdist workers on two cores,
  PyTorch's default of a thread per core has each worker's OpenMP threads spin against the other worker
  (measured on test_pipeline.py + test_pretrained.py with -n 2: 114.7 s -> 93.9 s wall, 205 s -> 164 s CPU).
* No silent skips: a skipped test fails the session unless its reason starts with one of ACCEPTED_SKIPS (a
  reference that is missing is an install error, not a skip).
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

ACCEPTED_SKIPS = ("needs a GPU", "needs a machine without a GPU")
# The files with the longest tests or groups (CI's --durations list), longest first; the rest keep their order.
SLOW_FIRST = ("test_shapes_demo.py", "test_train_script.py", "test_sharded_sampling.py", "test_pipeline.py",
              "test_sdxl.py", "test_sdxl_training.py", "test_sample_script.py")
_CACHE_ENV = "SDJAX_TEST_COMPILATION_CACHE"


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before any worker imports torch
    if _CACHE_ENV not in os.environ:  # the controller, or a run without xdist: workers inherit its choice
        os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="sdjax-xla-cache-")
        config._sdjax_owns_cache = True
    os.environ.update(JAX_COMPILATION_CACHE_DIR=os.environ[_CACHE_ENV],
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    import jax  # after the environment: jax reads it when first imported; update in case it was imported already

    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: tests keep their order within a file


def pytest_unconfigure(config):
    if getattr(config, "_sdjax_owns_cache", False):
        shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True)


def compilation_cache_dir() -> str:
    """The session's persistent compilation cache (for code that sets it explicitly)."""
    return os.environ[_CACHE_ENV]


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail") and not os.environ.get("PYTEST_XDIST_WORKER"):
        reason = _skip_reason(report)
        if not reason.startswith(ACCEPTED_SKIPS):
            _bad_skips.append(f"{report.nodeid}: {reason}")


_bad_skips: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if _bad_skips:
        terminalreporter.section("skips that fail the session")
        for line in _bad_skips:
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"{len(_bad_skips)} test(s) skipped without an accepted reason "
                                    f"(reasons must start with one of {ACCEPTED_SKIPS}): install what they need")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if _bad_skips and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
