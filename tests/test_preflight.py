"""Checks before the first node that are not about one setting: the tracking store's lock, a
writable artifact store, disk space for what the run writes, and every missing input in one
message. Fast: tiny files in tmp_path, no Kedro run, no network."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from clip_continual.runtime import store_lock


@pytest.fixture
def no_locks_held():
    yield
    store_lock.release_all()


def _hold_lock_in_another_process(lock):
    """A process that holds the lock as a run would: its pid and command in the file."""
    script = textwrap.dedent(f"""
        import fcntl, os, sys, time
        handle = open({str(lock)!r}, "a+")
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        handle.seek(0); handle.truncate()
        handle.write(f"{{os.getpid()}}\\nkedro run --pipelines mtil_order1\\n2026-01-01 10:00:00\\n"); handle.flush()
        print("locked", flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_the_same_store_fails_at_once_naming_the_other(tmp_path, no_locks_held):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lock = store_lock.lock_path(uri)
    assert lock == tmp_path / "mlflow.db.lock"
    holder = _hold_lock_in_another_process(lock)
    try:
        with pytest.raises(store_lock.StoreLockedError) as error:
            store_lock.acquire(uri)
        message = str(error.value)
        assert f"PID {holder.pid}" in message and "kedro run --pipelines mtil_order1" in message
        assert "MLFLOW_TRACKING_URI" in message and "tracking.enabled=false" in message
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (killed, its name still in the file): its lock is taken over.
    assert store_lock.acquire(uri, command="kedro run") == lock
    assert lock.read_text().splitlines()[:2] == [str(os.getpid()), "kedro run"]
    assert store_lock.acquire(uri) == lock  # this process again: no-op
    store_lock.release_all()
    assert lock.read_text() == ""


def test_only_a_local_sqlite_store_is_locked():
    assert store_lock.lock_path("http://127.0.0.1:5000") is None
    assert store_lock.lock_path("mlruns") is None


def test_an_unwritable_artifact_store_is_found_before_the_run(tmp_path):
    from clip_continual.runtime.tracking import TrackingStoreError, check_artifact_location, default_artifact_location

    (tmp_path / "mlartifacts").write_text("a file where the artifacts' folder belongs")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(TrackingStoreError, match=r"artifacts cannot be written to '.*mlartifacts'"):
        check_artifact_location(default_artifact_location(uri))
    (tmp_path / "mlartifacts").unlink()
    check_artifact_location(default_artifact_location(uri))  # a folder that can be made is fine
