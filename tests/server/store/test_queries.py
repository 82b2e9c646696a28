"""Auditor queries on the store, on SQLite and PostgreSQL: filters, orders, export batches and daily stats."""

import dataclasses
from datetime import date, datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, event

from server.store import AuditStore, JudgmentQuery, JudgmentRecord, upgrade_database
from tests.server.store.test_repository import BASE_TIME, make_record, make_started


@pytest.fixture
def store(engine: Engine) -> AuditStore:
    upgrade_database(engine)
    return AuditStore(engine)


def save_records(store: AuditStore, count: int, **fields) -> list[JudgmentRecord]:
    """Save ``count`` judgments a minute apart, so that their ids and created_at sort alike."""
    records = [
        dataclasses.replace(make_record(created_at=BASE_TIME + timedelta(minutes=i)), **fields) for i in range(count)
    ]
    for record in records:
        store.save(record)
    return records


def save_with(store: AuditStore, **fields) -> JudgmentRecord:
    record = dataclasses.replace(make_record(), **fields)
    store.save(record)
    return record


def listed_ids(store: AuditStore, **filters) -> list[str]:
    return [item.id for item in store.list(JudgmentQuery(**filters), limit=100, cursor=None).items]


def all_pages(store: AuditStore, query: JudgmentQuery, limit: int) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        page = store.list(query, limit=limit, cursor=cursor)
        pages.append([item.id for item in page.items])
        cursor = page.next_cursor
        if cursor is None:
            return pages


# Filters

def test_filter_model_and_heads(store):
    default = save_with(store)
    other_model = save_with(store, model_name="other-model")
    other_heads = save_with(store, heads_name="other-heads")

    assert listed_ids(store, model="other-model") == [other_model.id]
    assert listed_ids(store, heads="other-heads") == [other_heads.id]
    assert listed_ids(store, model=default.model_name, heads=default.heads_name) == [default.id]
    assert listed_ids(store, model="other") == []


def test_filter_metadata_pairs(store):
    docs = save_with(store, metadata={"team": "docs", "env": "prod"})
    docs_staging = save_with(store, metadata={"team": "docs", "env": "staging"})
    save_with(store, metadata={})

    assert listed_ids(store, metadata={"team": "docs"}) == [docs_staging.id, docs.id]
    assert listed_ids(store, metadata={"team": "docs", "env": "prod"}) == [docs.id]
    assert listed_ids(store, metadata={"team": "Docs"}) == []
    assert listed_ids(store, metadata={"owner": "docs"}) == []


@pytest.mark.parametrize("key, value", [
    ("café", "crème"),
    ('say "hi"', "back\\slash"),
    ("a.b[0]", "$.path"),
    ("empty", ""),
], ids=["non-ascii", "quote-backslash", "path-syntax", "empty-value"])
def test_filter_metadata_unusual_keys(store, key, value):
    match = save_with(store, metadata={key: value})
    save_with(store, metadata={key: value + "x"})

    assert listed_ids(store, metadata={key: value}) == [match.id]


def test_filter_text_in_output_ignores_case(store):
    paris = save_with(store, output="The capital of France is Paris.")
    save_with(store, output="The capital of Spain is Madrid.")

    assert listed_ids(store, text="PARIS") == [paris.id]
    assert listed_ids(store, text="france IS p") == [paris.id]


def test_filter_text_in_prompt(store):
    chat = save_with(store, prompt={"messages": [{"role": "user", "content": 'Is "Rome" in Italy?'}]}, output="Yes.")
    raw = save_with(store, prompt={"prompt": "Water boils at"}, output="100 degrees.")
    windows = save_with(store, prompt={"prompt": "Open C:\\Temp\\notes.txt"}, output="Done.")

    assert listed_ids(store, text='"rome"') == [chat.id]
    assert listed_ids(store, text="water BOILS") == [raw.id]
    assert listed_ids(store, text="c:\\temp\\") == [windows.id]


def test_filter_text_escapes_like_wildcards(store):
    percent = save_with(store, output="Growth was 100% this year.")
    save_with(store, output="Growth was 1000 units.")
    underscore = save_with(store, output="Set max_tokens to 8.")
    save_with(store, output="Set maxXtokens to 8.")

    assert listed_ids(store, text="100%") == [percent.id]
    assert listed_ids(store, text="max_tokens") == [underscore.id]


def test_filter_text_non_ascii(store):
    accented = save_with(store, prompt={"prompt": "Où est la gare?"}, output="À gauche.")
    save_with(store, prompt={"prompt": "Ou est la gare?"}, output="A gauche.")

    assert listed_ids(store, text="Où est") == [accented.id]
    assert listed_ids(store, text="À gauche") == [accented.id]


def test_filters_combine_with_verdicts(store):
    match = save_with(store, model_name="m2", metadata={"team": "docs"}, output="Paris")
    save_with(store, model_name="m2", metadata={"team": "docs"}, output="Rome")
    save_with(store, model_name="m2", metadata={"team": "ops"}, output="Paris")
    low_score = make_record(scores={"decidability": 0.5}).verdicts
    save_with(store, model_name="m2", metadata={"team": "docs"}, output="Paris", verdicts=low_score)

    query = {"model": "m2", "metadata": {"team": "docs"}, "text": "paris", "constraint": "decidability",
             "min_score": 0.85}
    assert listed_ids(store, **query) == [match.id]


def test_query_rejects_unknown_order():
    with pytest.raises(ValueError, match="order='sideways' is not an order. Use one of 'newest', 'oldest'."):
        JudgmentQuery(order="sideways")


# Orders and cursor paging

def test_list_oldest_first(store):
    records = save_records(store, 3)

    page = store.list(JudgmentQuery(order="oldest"), limit=10, cursor=None)

    assert [item.id for item in page.items] == [record.id for record in records]
    assert page.next_cursor is None


@pytest.mark.parametrize("order", ["newest", "oldest"])
def test_cursor_pages_in_both_orders(store, order):
    records = save_records(store, 7)
    expected = [record.id for record in records]
    if order == "newest":
        expected.reverse()

    pages = all_pages(store, JudgmentQuery(order=order), limit=3)

    assert [len(page) for page in pages] == [3, 3, 1]
    assert [judgment_id for page in pages for judgment_id in page] == expected


@pytest.mark.parametrize("order", ["newest", "oldest"])
def test_cursor_paging_keeps_new_filters(store, order):
    records = [save_with(store, metadata={"team": "docs" if i % 2 else "ops"}) for i in range(7)]
    expected = sorted((record.id for record in records if record.metadata["team"] == "docs"),
                      reverse=order == "newest")

    pages = all_pages(store, JudgmentQuery(metadata={"team": "docs"}, order=order), limit=2)

    assert [len(page) for page in pages] == [2, 1]
    assert [judgment_id for page in pages for judgment_id in page] == expected


# Export

def count_judgment_selects(engine: Engine) -> list[int]:
    """Count the SELECTs from judgments that the engine runs, in the one item of the returned list."""
    counter = [0]

    def count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().startswith("SELECT") and "FROM judgments" in statement:
            counter[0] += 1

    event.listen(engine, "before_cursor_execute", count)
    return counter


@pytest.mark.parametrize("order", ["newest", "oldest"])
def test_export_reads_in_batches(store, engine, order):
    records = save_records(store, 7)
    expected = [record.id for record in records]
    if order == "newest":
        expected.reverse()
    selects = count_judgment_selects(engine)

    exported = store.export(JudgmentQuery(order=order), batch_size=3)
    first_three = [next(exported).id for _ in range(3)]

    assert selects[0] == 1
    rest = [record.id for record in exported]
    assert first_three + rest == expected
    # Batches of 3, 3 and 1: the short last batch shows that no more rows follow.
    assert selects[0] == 3


def test_export_ends_after_full_batches(store, engine):
    records = save_records(store, 6)
    selects = count_judgment_selects(engine)

    exported = list(store.export(JudgmentQuery(), batch_size=3))

    assert [record.id for record in exported] == [record.id for record in reversed(records)]
    # Two full batches, then an empty one.
    assert selects[0] == 3


def test_export_leaves_out_trace_by_default(store):
    [record] = save_records(store, 1)

    [without_trace] = store.export(JudgmentQuery())
    [with_trace] = store.export(JudgmentQuery(), with_trace=True)

    assert without_trace == dataclasses.replace(record, trace=None)
    assert with_trace == record


def test_export_applies_filters(store):
    records = save_records(store, 5)
    flagged = [save_with(store, flagged=True, created_at=BASE_TIME + timedelta(hours=1)) for _ in range(4)]

    exported = store.export(JudgmentQuery(flagged=True, order="oldest"), batch_size=2)

    assert [record.id for record in exported] == [record.id for record in flagged]
    assert len(list(store.export(JudgmentQuery()))) == len(records) + len(flagged)


def test_export_sees_judgment_saved_between_batches(store):
    records = save_records(store, 4)

    exported = store.export(JudgmentQuery(order="oldest"), batch_size=2)
    first = next(exported)
    # No transaction is open between batches, so this commit does not wait for the export.
    late = save_with(store)
    rest = list(exported)

    assert [first.id, *(record.id for record in rest)] == [record.id for record in records] + [late.id]


def test_export_of_no_match_is_empty(store):
    save_records(store, 2)

    assert list(store.export(JudgmentQuery(model="absent"))) == []


def test_export_rejects_zero_batch(store):
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        next(store.export(JudgmentQuery(), batch_size=0))


# Daily stats

def save_day(store: AuditStore, day: datetime, causality_scores: list[float]) -> None:
    """Save one judgment per score, each with a causality verdict and a decidability verdict that passes."""
    for i, score in enumerate(causality_scores):
        created_at = day + timedelta(minutes=i)
        store.save(make_record(created_at=created_at, scores={"causality": score, "decidability": 0.9}))


def stats_table(store: AuditStore, **filters) -> list[tuple]:
    return [(stat.day, stat.constraint, stat.judgments, stat.passed, stat.pass_rate)
            for stat in store.daily_stats(JudgmentQuery(**filters))]


def test_daily_stats_counts(store):
    save_day(store, datetime(2026, 12, 3, 9, tzinfo=timezone.utc), [0.9, 0.1, 0.2, 0.7])
    save_day(store, datetime(2026, 12, 4, 23, 50, tzinfo=timezone.utc), [0.6, 0.6])

    assert stats_table(store) == [
        (date(2026, 12, 3), "causality", 4, 2, 0.5),
        (date(2026, 12, 3), "decidability", 4, 4, 1.0),
        (date(2026, 12, 4), "causality", 2, 2, 1.0),
        (date(2026, 12, 4), "decidability", 2, 2, 1.0),
    ]


def test_daily_stats_group_by_utc_day(store):
    # 23:30 at -02:00 is 01:30 UTC on the next day.
    store.save(make_record(created_at=datetime(2026, 12, 3, 23, 30, tzinfo=timezone(timedelta(hours=-2))),
                           scores={"causality": 0.1}))
    store.save(make_record(created_at=datetime(2026, 12, 4, 23, 59, 59, 999999, tzinfo=timezone.utc),
                           scores={"causality": 0.9}))

    assert stats_table(store) == [(date(2026, 12, 4), "causality", 2, 1, 0.5)]


def test_daily_stats_apply_filters(store):
    save_day(store, datetime(2026, 12, 3, 9, tzinfo=timezone.utc), [0.9, 0.1, 0.2])
    save_with(store, created_at=datetime(2026, 12, 3, 10, tzinfo=timezone.utc), model_name="other-model")

    assert stats_table(store, constraint="causality") == [(date(2026, 12, 3), "causality", 3, 1, 1 / 3)]
    assert stats_table(store, constraint="causality", passed=False) == [(date(2026, 12, 3), "causality", 2, 0, 0.0)]
    assert stats_table(store, model="other-model") == [
        (date(2026, 12, 3), "decidability", 1, 1, 1.0),
        (date(2026, 12, 3), "testifiability", 1, 1, 1.0),
    ]
    assert stats_table(store, since=datetime(2026, 12, 4, tzinfo=timezone.utc)) == []


def test_daily_stats_skip_judgments_without_verdicts(store):
    store.start(make_started(make_record(created_at=BASE_TIME)))

    assert stats_table(store) == []
    assert stats_table(store, status="started") == []
