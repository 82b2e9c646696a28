"""Group commit: the writes of concurrent callers share one transaction, and so one fsync.

Each caller queues its write. The first caller to find no group in progress
becomes the leader. It takes the writes waiting (its own first), commits them
through ``commit_group``, hands the lead to the oldest write still waiting, and
wakes each caller whose write it committed. While one group commits, the next
one gathers, so groups grow with the load. A caller that finds no other write
in progress leads a group of one at once, so a lone write never waits for others.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

W = TypeVar("W")

# One outcome per write: None when it was committed, else the exception its caller raises.
CommitGroup = Callable[[list[W]], list[Exception | None]]


class _Pending(Generic[W]):
    """One caller's write, waiting in the queue or in a group being committed."""

    def __init__(self, write: W) -> None:
        self.write = write
        # Set when the write is done, or when its caller is handed the lead.
        self.woken = threading.Event()
        self.done = False
        self.error: BaseException | None = None


class GroupCommitter(Generic[W]):
    """Commits the writes of concurrent callers in groups, one caller leading each group in its own thread."""

    def __init__(self, commit_group: CommitGroup, max_group_size: int) -> None:
        if max_group_size < 1:
            raise ValueError(f"max_group_size must be at least 1, got {max_group_size}")
        self._commit_group = commit_group
        self._max_group_size = max_group_size
        self._lock = threading.Lock()
        self._queue: deque[_Pending[W]] = deque()
        # Invariant, under _lock: a non-empty queue has a leader, running or woken to run.
        self._has_leader = False

    def submit(self, write: W) -> None:
        """Return once ``write`` is committed, or raise the exception that its own commit raised."""
        pending = _Pending(write)
        with self._lock:
            self._queue.append(pending)
            leads = not self._has_leader
            self._has_leader = True

        if not leads:
            pending.woken.wait()
        if not pending.done:
            self._lead()
        if pending.error is not None:
            raise pending.error

    def _lead(self) -> None:
        """Commit the writes at the head of the queue, the leader's own first, then pass the lead on."""
        with self._lock:
            group = [self._queue.popleft() for _ in range(min(len(self._queue), self._max_group_size))]
        try:
            outcomes = self._commit_group([pending.write for pending in group])
            for pending, outcome in zip(group, outcomes, strict=True):
                pending.error, pending.done = outcome, True
        except BaseException:
            logger.exception("Group commit of %d writes failed outside any one write", len(group))
            raise
        finally:
            # Only a bug in commit_group, or an interrupt of the leader's thread, leaves writes undone here.
            # Their callers get an error rather than waiting forever, and the leader's own error propagates.
            for pending in group:
                if not pending.done:
                    pending.error = RuntimeError("The group commit that held this write failed. "
                                                 "Its error is in the log.")
                    pending.done = True
            self._pass_lead()
            for pending in group:
                pending.woken.set()

    def _pass_lead(self) -> None:
        with self._lock:
            successor = self._queue[0] if self._queue else None
            self._has_leader = successor is not None
        if successor is not None:
            successor.woken.set()
