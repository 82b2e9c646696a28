"""GroupCommitter without a database: who leads, what a group holds, whose error is whose."""

import threading
import time
from collections.abc import Callable

import pytest

from server.store.group_commit import GroupCommitter

# Seconds a test waits for threads before it fails rather than hanging.
TIMEOUT_S = 30


class RecordingCommit:
    """A commit_group that records each group and the thread that ran it, optionally holding the first."""

    def __init__(self, hold_first: bool = False, errors: dict[str, Exception] | None = None):
        self.groups: list[list[str]] = []
        self.threads: list[threading.Thread] = []
        self.errors = errors or {}
        self.first_started = threading.Event()
        self.release_first = threading.Event()
        if not hold_first:
            self.release_first.set()

    def __call__(self, group: list[str]) -> list[Exception | None]:
        self.groups.append(list(group))
        self.threads.append(threading.current_thread())
        self.first_started.set()
        assert self.release_first.wait(TIMEOUT_S)
        return [self.errors.get(write) for write in group]


def wait_until_queued(committer: GroupCommitter, count: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while len(committer._queue) < count:
        assert time.monotonic() < deadline, f"{len(committer._queue)} of {count} writes queued"
        time.sleep(0.001)


def run_in_threads(calls: dict[str, Callable[[], object]]) -> tuple[list[threading.Thread], dict]:
    """Start one thread per call. The returned dict maps each call's name to its exception, or None, once done."""
    outcomes: dict[str, Exception | None] = {}

    def run(name: str) -> None:
        try:
            calls[name]()
            outcomes[name] = None
        except Exception as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=run, args=(name,)) for name in calls]
    for thread in threads:
        thread.start()
    return threads, outcomes


def join_all(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(TIMEOUT_S)
        assert not thread.is_alive()


def run_behind_held_group(committer: GroupCommitter, first_started: threading.Event, release_first: threading.Event,
                          start_first: Callable[[], object], calls: dict[str, Callable[[], object]]) -> dict:
    """Run ``start_first``, whose group waits for ``release_first``, then ``calls``, which queue behind it.

    Returns what run_in_threads returns for ``calls``, once every thread is done.
    """
    leader, _ = run_in_threads({"first": start_first})
    assert first_started.wait(TIMEOUT_S)
    followers, outcomes = run_in_threads(calls)
    wait_until_queued(committer, len(calls))
    release_first.set()
    join_all(leader + followers)
    return outcomes


def submit_behind_held_group(committer: GroupCommitter, commit: RecordingCommit, writes: list[str]) -> dict:
    """Submit "first", held by ``commit``, and then ``writes``; return each write's error, or None."""
    calls = {write: lambda write=write: committer.submit(write) for write in writes}
    return run_behind_held_group(committer, commit.first_started, commit.release_first,
                                 lambda: committer.submit("first"), calls)


def test_lone_write_commits_in_own_thread():
    commit = RecordingCommit()
    committer = GroupCommitter(commit, max_group_size=8)

    committer.submit("a")

    assert commit.groups == [["a"]]
    assert commit.threads == [threading.current_thread()]


def test_lone_writes_do_not_wait():
    commit = RecordingCommit()
    committer = GroupCommitter(commit, max_group_size=8)

    started = time.perf_counter()
    for number in range(500):
        committer.submit(f"write-{number}")
    elapsed = time.perf_counter() - started

    # A wait for other writes of 0.5 ms or more per write would reach the bound, which leaves room for slow machines.
    assert elapsed < 0.25
    assert all(len(group) == 1 for group in commit.groups)


def test_waiting_writes_commit_as_one_group():
    commit = RecordingCommit(hold_first=True)
    committer = GroupCommitter(commit, max_group_size=8)

    outcomes = submit_behind_held_group(committer, commit, ["b", "c", "d"])

    assert commit.groups[0] == ["first"]
    assert sorted(commit.groups[1]) == ["b", "c", "d"]
    assert len(commit.groups) == 2
    assert outcomes == {"b": None, "c": None, "d": None}


def test_group_size_is_bounded():
    commit = RecordingCommit(hold_first=True)
    committer = GroupCommitter(commit, max_group_size=2)

    outcomes = submit_behind_held_group(committer, commit, ["b", "c", "d", "e", "f"])

    assert [len(group) for group in commit.groups] == [1, 2, 2, 1]
    assert sorted(write for group in commit.groups for write in group) == ["b", "c", "d", "e", "f", "first"]
    assert set(outcomes.values()) == {None}


def test_error_reaches_only_its_writer():
    duplicate = RuntimeError("duplicate id")
    commit = RecordingCommit(hold_first=True, errors={"bad": duplicate})
    committer = GroupCommitter(commit, max_group_size=8)

    outcomes = submit_behind_held_group(committer, commit, ["good", "bad", "other"])

    assert outcomes["bad"] is duplicate
    assert outcomes["good"] is None
    assert outcomes["other"] is None


def test_failing_leader_releases_followers():
    commits = {"count": 0}
    started, release = threading.Event(), threading.Event()

    def commit_group(group: list[str]) -> list[Exception | None]:
        commits["count"] += 1
        if commits["count"] == 2:
            raise KeyError("a bug in commit_group")
        if commits["count"] == 1:
            started.set()
            assert release.wait(TIMEOUT_S)
        return [None] * len(group)

    committer = GroupCommitter(commit_group, max_group_size=8)
    calls = {write: lambda write=write: committer.submit(write) for write in ("b", "c")}
    outcomes = run_behind_held_group(committer, started, release, lambda: committer.submit("first"), calls)

    # The second group's leader gets the bug itself, and the other writer an error saying that its group failed.
    errors = sorted(type(error).__name__ for error in outcomes.values())
    assert errors == ["KeyError", "RuntimeError"]
    committer.submit("after")
    assert commits["count"] == 3


def test_rejects_empty_group_size():
    with pytest.raises(ValueError, match="max_group_size must be at least 1, got 0"):
        GroupCommitter(RecordingCommit(), max_group_size=0)
