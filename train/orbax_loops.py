"""Failed orbax restores leave nothing running (train/checkpoint.py, train/adapter.py).

orbax runs each restore in a fresh asyncio event loop and closes that loop as soon as the
restore's coroutine ends — with a damaged checkpoint, at the first array that cannot be
read, while the reads of the other arrays are still in flight. Their tasks are orphaned:
tensorstore later calls back into the closed loop (``RuntimeError: Event loop is
closed``) and asyncio logs ``Task exception was never retrieved`` for each when it is
collected, pages of tracebacks after the one-line error. Inside :func:`settled_restore`,
an event loop lets its pending tasks finish (cancelling those still running after
:data:`SETTLE_SECONDS`) and retrieves the outcome of every task it ran before it closes.

(Event loop policies are deprecated from Python 3.14; orbax creates its loops through
``asyncio.new_event_loop``, which asks the policy, and offers no other hook.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

SETTLE_SECONDS = 30.0


def _settle_before_closing(loop: asyncio.AbstractEventLoop) -> None:
    """Records each task created on ``loop``; closing it first lets them finish.

    ``asyncio.all_tasks`` is not enough: a task that failed in the loop's last iteration
    is done, but the callback that would retrieve its exception (``asyncio.gather``'s) is
    still queued when the loop stops, and closing drops it.
    """
    created: list[asyncio.Task] = []
    close = loop.close

    def record(loop: asyncio.AbstractEventLoop, coro, **kwargs) -> asyncio.Task:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        created.append(task)
        return task

    def settle_then_close() -> None:
        if created and not loop.is_running() and not loop.is_closed():
            pending = [task for task in created if not task.done()]
            if pending:
                _, late = loop.run_until_complete(asyncio.wait(pending, timeout=SETTLE_SECONDS))
                for task in late:
                    task.cancel()
            # return_exceptions: every task's outcome is retrieved, none is logged
            loop.run_until_complete(asyncio.gather(*created, return_exceptions=True))
            created.clear()
        close()

    loop.set_task_factory(record)
    loop.close = settle_then_close


class _SettlingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        _settle_before_closing(loop)
        return loop


@contextlib.contextmanager
def settled_restore() -> Iterator[None]:
    """Event loops created inside finish their tasks before they close (see the module).

    A custom event loop policy already in place is left alone.
    """
    previous = asyncio.get_event_loop_policy()
    if type(previous) is not asyncio.DefaultEventLoopPolicy:
        yield
        return
    asyncio.set_event_loop_policy(_SettlingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)
