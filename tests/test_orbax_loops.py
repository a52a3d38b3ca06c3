"""train/orbax_loops.py: restoring a damaged orbax checkpoint fails without leaving reads
in flight, which would call back into a closed event loop or be logged at exit."""

from __future__ import annotations

import asyncio
import gc
import shutil
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from train.orbax_loops import settled_restore


def _orphans():
    """asyncio tasks of a closed event loop that have not finished (they never will); the
    collection logs those that nothing refers to any more."""
    gc.collect()
    return {
        id(o)
        for o in gc.get_objects()
        if type(o) is asyncio.Task and o.get_loop().is_closed() and not o.done()
    }


# An orphaned read calls back into its closed loop: an unraisable exception, an error here.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_failed_restore_leaves_no_read_in_flight(tmp_path, caplog):
    tree = {f"w{i}": jnp.full((8, 8), float(i)) for i in range(200)}  # 200 reads at once
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", tree)
    shutil.rmtree(tmp_path / "ckpt" / "d")  # the array data is gone
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    before, policy = _orphans(), asyncio.get_event_loop_policy()
    for _ in range(10):  # without settled_restore, orbax orphans reads in most attempts
        with (
            pytest.raises(ValueError, match="NOT_FOUND"),
            settled_restore(),
            ocp.StandardCheckpointer() as checkpointer,
        ):
            checkpointer.restore(tmp_path / "ckpt", like)
    time.sleep(0.5)  # the other reads fail within milliseconds: any callback happens now
    assert not _orphans() - before
    # asyncio logs an orphaned task as it is collected ("Task exception was never retrieved")
    assert not [record.getMessage() for record in caplog.records if record.name == "asyncio"]
    assert asyncio.get_event_loop_policy() is policy


def test_a_task_that_failed_as_the_loop_stopped_is_retrieved(caplog):
    # The race orbax's restores lose now and then: a read fails in the loop's last
    # iteration, so it is done (not in asyncio.all_tasks) but the callback that would
    # retrieve its exception never runs. Here, deterministically: nothing awaits the task.
    async def fail():
        raise ValueError("a read failed")

    async def restore():
        asyncio.ensure_future(fail())
        await asyncio.sleep(0)  # the task fails in the iteration in which this returns

    with settled_restore():
        loop = asyncio.new_event_loop()  # as orbax's asyncio_utils.run_sync does
        loop.run_until_complete(restore())
        loop.close()
    del loop
    gc.collect()
    assert not [record.getMessage() for record in caplog.records if record.name == "asyncio"]


def test_a_custom_event_loop_policy_is_left_alone():
    custom = type("Custom", (asyncio.DefaultEventLoopPolicy,), {})()
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(custom)
    try:
        with settled_restore():
            assert asyncio.get_event_loop_policy() is custom
    finally:
        asyncio.set_event_loop_policy(previous)
