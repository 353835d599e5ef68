"""Stage 2's table of recent ops' source lines (processors/op_refs.py): kept as the batches' columns."""

from rankwatch.processors.op_refs import RecentRefs


def batch(first: int, n: int, rank: int = 0, comm: str = "id:c", tag: str = "a") -> list[list]:
    return [[comm] * n, list(range(first, first + n)), [rank] * n, [f"{tag}{rank}.log"] * n,
            [1000 * rank + k for k in range(first, first + n)]]


def test_finds_each_ops_line_and_the_latest_of_a_repeated_op():
    refs = RecentRefs(keep=100)
    refs.add(*batch(0, 10, rank=0))
    refs.add(*batch(0, 10, rank=1))
    assert refs.get(("id:c", 3, 1)) == ("a1.log", 1003)
    assert refs.get(("id:c", 3, 0)) == ("a0.log", 3)
    assert refs.get(("id:c", 3, 2)) is None and refs.get(("id:x", 3, 0), ("", -1)) == ("", -1)
    refs.add(*batch(3, 1, rank=1, tag="again"))  # the same op seen again (a replayed partition): newest wins
    assert refs.get(("id:c", 3, 1)) == ("again1.log", 1003)
    # within one batch too, the later row wins
    refs.add(["id:d", "id:d"], [7, 7], [0, 0], ["first.log", "second.log"], [1, 2])
    assert refs.get(("id:d", 7, 0)) == ("second.log", 2)


def test_keeps_at_least_the_latest_keep_ops_and_drops_whole_old_batches():
    refs = RecentRefs(keep=50)
    for k in range(20):
        refs.add(*batch(10 * k, 10))
    assert 50 <= len(refs) < 60  # bounded: old batches dropped whole, never below `keep`
    assert refs.get(("id:c", 199, 0)) == ("a0.log", 199)
    assert refs.get(("id:c", 150, 0)) == ("a0.log", 150)
    assert refs.get(("id:c", 100, 0)) is None  # long gone


def test_rows_round_trip_keeps_the_latest_ops_in_order():
    refs = RecentRefs()
    refs.add(*batch(0, 30, rank=2))
    refs.add(*batch(0, 30, rank=3))
    rows = refs.rows(40)
    assert len(rows) == 40 and rows[-1] == ["id:c", 29, 3, "a3.log", 3029] and rows[0] == ["id:c", 20, 2,
                                                                                           "a2.log", 2020]
    back = RecentRefs.from_rows(rows)
    assert back.get(("id:c", 25, 2)) == ("a2.log", 2025) and back.get(("id:c", 19, 2)) is None
    assert len(RecentRefs.from_rows([])) == 0
