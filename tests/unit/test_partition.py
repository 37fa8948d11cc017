"""Dirichlet label-skew partitioning: invariants, heterogeneity, files and errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedumm.data.partition import (
    Partition,
    build_partition,
    client_names,
    dirichlet_partition,
    load_partition,
    partition_stats,
    save_partition,
)
from fedumm.errors import ConfigError, DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_labels(n: int = 2000, classes: int = 20, seed: int = 123) -> list[str]:
    """Labels over ``classes`` answers with an uneven (Zipf-like) class frequency."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, classes + 1)
    drawn = rng.choice(classes, size=n, p=weights / weights.sum())
    return [f"ans{c:02d}" for c in drawn]


LABELS = make_labels()


def check_exactly_once(parts: list[list[int]], n: int) -> None:
    flat = [i for p in parts for i in p]
    assert len(flat) == n
    assert sorted(flat) == list(range(n))


# ------------------------------------------------------------------------------ client names


def test_client_names_small() -> None:
    assert client_names(1) == ["site-01"]
    assert client_names(16)[0] == "site-01"
    assert client_names(16)[-1] == "site-16"


@pytest.mark.parametrize("k", [9, 10, 99, 100, 101, 1000])
def test_client_names_sort_numerically(k: int) -> None:
    names = client_names(k)
    assert len(names) == len(set(names)) == k
    assert sorted(names) == names
    width = max(2, len(str(k)))
    assert names[-1] == f"site-{k:0{width}d}"
    assert all(len(n) == len("site-") + width for n in names)


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_client_names_rejects_bad_k(k: object) -> None:
    with pytest.raises(ConfigError):
        client_names(k)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ invariants


@pytest.mark.parametrize("alpha", [0.0, 0.01, 0.1, 0.5, 1.0, 100.0])
@pytest.mark.parametrize("k", [1, 2, 4, 16, 64])
def test_invariants(k: int, alpha: float) -> None:
    min_size = 5
    parts = dirichlet_partition(LABELS, num_clients=k, alpha=alpha, min_size=min_size, seed=7)
    assert len(parts) == k
    check_exactly_once(parts, len(LABELS))
    assert all(len(p) >= min_size for p in parts)
    assert all(p == sorted(p) for p in parts)
    again = dirichlet_partition(LABELS, num_clients=k, alpha=alpha, min_size=min_size, seed=7)
    assert again == parts
    if k > 1:
        other = dirichlet_partition(LABELS, num_clients=k, alpha=alpha, min_size=min_size, seed=8)
        assert other != parts


@pytest.mark.parametrize("alpha", [0.01, 0.1])
def test_min_size_top_up_with_tight_budget(alpha: float) -> None:
    # 64 clients x 31 = 1984 of 2000 samples: almost everything has to be rebalanced.
    parts = dirichlet_partition(LABELS, num_clients=64, alpha=alpha, min_size=31, seed=3)
    check_exactly_once(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 31


def test_min_size_exactly_fills() -> None:
    labels = ["a", "b"] * 8
    parts = dirichlet_partition(labels, num_clients=4, alpha=0.05, min_size=4, seed=0)
    assert [len(p) for p in parts] == [4, 4, 4, 4]
    check_exactly_once(parts, len(labels))


def test_min_size_zero_allows_empty_clients() -> None:
    parts = dirichlet_partition(LABELS, num_clients=64, alpha=0.01, min_size=0, seed=1)
    check_exactly_once(parts, len(LABELS))
    assert any(len(p) == 0 for p in parts)


def test_many_clients_beyond_64() -> None:
    parts = dirichlet_partition(LABELS, num_clients=200, alpha=0.5, min_size=2, seed=0)
    check_exactly_once(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 2


def test_single_class_labels() -> None:
    labels = ["yes"] * 300
    parts = dirichlet_partition(labels, num_clients=8, alpha=0.1, min_size=3, seed=0)
    check_exactly_once(parts, 300)
    assert min(len(p) for p in parts) >= 3


@pytest.mark.parametrize("k", [1, 3, 7, 16, 64])
def test_iid_sizes_differ_by_at_most_one(k: int) -> None:
    parts = dirichlet_partition(LABELS, num_clients=k, alpha=0, seed=5)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    check_exactly_once(parts, len(LABELS))


def test_alpha_accepts_int_and_numpy_numbers() -> None:
    a = dirichlet_partition(LABELS, num_clients=4, alpha=1, seed=2)
    b = dirichlet_partition(LABELS, num_clients=np.int64(4), alpha=np.float64(1.0), seed=2)
    assert a == b


def test_heterogeneity_decreases_with_alpha() -> None:
    qids = list(range(len(LABELS)))

    def mean_tv(alpha: float) -> float:
        values = [
            partition_stats(build_partition(qids, LABELS, num_clients=8, alpha=alpha, seed=s))[
                "mean_tv_distance"
            ]
            for s in range(5)
        ]
        return float(np.mean(values))

    skewed, medium, flat, iid = mean_tv(0.1), mean_tv(1.0), mean_tv(100.0), mean_tv(0.0)
    # Observed means are about 0.68, 0.32, 0.04 and (IID, sampling noise only) 0.09.
    assert skewed > medium + 0.1
    assert medium > flat + 0.1
    assert skewed > 0.5
    assert flat < 0.15
    assert iid < 0.15


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_clients": 0, "alpha": 1.0}, "num_clients"),
        ({"num_clients": -2, "alpha": 1.0}, "num_clients"),
        ({"num_clients": 2.0, "alpha": 1.0}, "num_clients"),
        ({"num_clients": True, "alpha": 1.0}, "num_clients"),
        ({"num_clients": 2, "alpha": -0.1}, "alpha"),
        ({"num_clients": 2, "alpha": math.nan}, "alpha"),
        ({"num_clients": 2, "alpha": math.inf}, "alpha"),
        ({"num_clients": 2, "alpha": "1"}, "alpha"),
        ({"num_clients": 2, "alpha": 1.0, "min_size": -1}, "min_size"),
        ({"num_clients": 2, "alpha": 1.0, "seed": -1}, "seed"),
        ({"num_clients": 2, "alpha": 1.0, "seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        dirichlet_partition(LABELS[:50], **kwargs)


def test_empty_labels() -> None:
    with pytest.raises(ConfigError, match="empty"):
        dirichlet_partition([], num_clients=2, alpha=1.0)


def test_string_as_labels_rejected() -> None:
    with pytest.raises(ConfigError):
        dirichlet_partition("abc", num_clients=2, alpha=1.0)


def test_min_size_infeasible_names_numbers() -> None:
    with pytest.raises(ConfigError, match=r"num_clients=4.*min_size=3.*12.*10"):
        dirichlet_partition(LABELS[:10], num_clients=4, alpha=1.0, min_size=3)


def test_build_partition_argument_errors() -> None:
    with pytest.raises(ConfigError, match="length"):
        build_partition([1, 2], ["a"], num_clients=1, alpha=0)
    with pytest.raises(ConfigError, match="question id 5"):
        build_partition([5, 5], ["a", "b"], num_clients=1, alpha=0)
    with pytest.raises(ConfigError, match=r"answers\[1\]"):
        build_partition([1, 2], ["a", 3], num_clients=1, alpha=0)  # type: ignore[list-item]
    with pytest.raises(ConfigError, match=r"question_ids\[0\]"):
        build_partition(["x", 2], ["a", "b"], num_clients=1, alpha=0)  # type: ignore[list-item]


def test_partition_constructor_rejects_duplicates() -> None:
    with pytest.raises(ConfigError, match="question id 3"):
        Partition(
            clients={"site-01": (1, 3), "site-02": (3,)},
            answer_counts={"site-01": {"a": 2}, "site-02": {"a": 1}},
        )


# ------------------------------------------------------------------------------ partition + files


def small_partition(alpha: float = 0.5, k: int = 4) -> tuple[Partition, list[int]]:
    qids = [1000 + 3 * i for i in range(len(LABELS))]
    return build_partition(qids, LABELS, num_clients=k, alpha=alpha, min_size=2, seed=11), qids


def test_build_partition_maps_ids_and_counts() -> None:
    part, qids = small_partition()
    answer_of = dict(zip(qids, LABELS, strict=True))
    assert list(part.clients) == client_names(4)
    assert sorted(q for ids in part.clients.values() for q in ids) == sorted(qids)
    for name, ids in part.clients.items():
        expected: dict[str, int] = {}
        for q in ids:
            expected[answer_of[q]] = expected.get(answer_of[q], 0) + 1
        assert dict(part.answer_counts[name]) == expected
        assert list(part.answer_counts[name]) == sorted(expected)
    assert part.meta is not None
    assert (part.meta.num_clients, part.meta.num_samples) == (4, len(qids))


def test_partition_is_immutable() -> None:
    part, _ = small_partition()
    with pytest.raises(AttributeError):
        part.meta = None  # type: ignore[misc]
    with pytest.raises(TypeError):
        part.clients["site-01"] = ()  # type: ignore[index]


def test_to_json_format() -> None:
    part, _ = small_partition()
    data = part.to_json()
    assert set(data) == {"clients", "meta"}
    assert data["meta"] == {
        "alpha": 0.5,
        "seed": 11,
        "min_size": 2,
        "num_clients": 4,
        "num_samples": len(LABELS),
    }
    for name, entry in data["clients"].items():
        assert set(entry) == {"question_ids", "answer_counts"}
        assert entry["question_ids"] == list(part.clients[name])
        assert list(entry["answer_counts"]) == sorted(entry["answer_counts"])
        assert all(type(c) is int for c in entry["answer_counts"].values())
        assert all(type(q) is int for q in entry["question_ids"])
    json.dumps(data)  # serialisable as is


def test_json_round_trip_and_png(tmp_path) -> None:
    part, _ = small_partition()
    path = tmp_path / "out" / "partition.json"
    png = save_partition(part, path)
    assert png == path.with_suffix(".png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert png.stat().st_size > 1000
    loaded = load_partition(path)
    assert loaded == part
    assert loaded.to_json() == part.to_json()
    assert json.loads(path.read_text()) == part.to_json()
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_save_without_heatmap(tmp_path) -> None:
    part, _ = small_partition()
    path = tmp_path / "p.json"
    assert save_partition(part, path, heatmap=False) is None
    assert path.exists() and not path.with_suffix(".png").exists()


def test_heatmap_many_clients_and_answers(tmp_path) -> None:
    labels = make_labels(n=3000, classes=60, seed=4)
    part = build_partition(list(range(3000)), labels, num_clients=64, alpha=0.1, min_size=1, seed=0)
    png = save_partition(part, tmp_path / "big.json")
    assert png is not None and png.read_bytes()[:8] == PNG_SIGNATURE


def test_save_rejects_png_path(tmp_path) -> None:
    part, _ = small_partition()
    with pytest.raises(ConfigError, match="png"):
        save_partition(part, tmp_path / "p.png")


def test_load_without_meta(tmp_path) -> None:
    path = tmp_path / "p.json"
    path.write_text(
        json.dumps({"clients": {"site-01": {"question_ids": [4, 2], "answer_counts": {"b": 1, "a": 1}}}})
    )
    part = load_partition(path)
    assert part.meta is None
    assert part.clients == {"site-01": (4, 2)}
    assert list(part.answer_counts["site-01"]) == ["a", "b"]


def write_json(tmp_path, obj) -> object:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj))
    return path


def entry(ids: list, counts: dict) -> dict:
    return {"question_ids": ids, "answer_counts": counts}


def test_load_rejects_duplicate_across_clients(tmp_path) -> None:
    path = write_json(
        tmp_path,
        {"clients": {"site-01": entry([1, 2], {"a": 2}), "site-02": entry([3, 2], {"a": 2})}},
    )
    with pytest.raises(DataError, match=r"question id 2.*'site-01'.*'site-02'") as info:
        load_partition(path)
    assert "bad.json" in str(info.value)


def test_load_rejects_duplicate_within_client(tmp_path) -> None:
    path = write_json(tmp_path, {"clients": {"site-01": entry([7, 7], {"a": 2})}})
    with pytest.raises(DataError, match=r"'site-01'.*question id 7"):
        load_partition(path)


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ([], "top level"),
        ({}, "clients"),
        ({"clients": {}}, "clients"),
        ({"clients": {"site-01": entry([1], {"a": 1})}, "extra": 1}, "extra"),
        ({"clients": {"site-01": [1, 2]}}, "site-01"),
        ({"clients": {"site-01": {"question_ids": [1]}}}, "site-01"),
        ({"clients": {"site-01": entry([1, "2"], {"a": 2})}}, "site-01"),
        ({"clients": {"site-01": entry([1, True], {"a": 2})}}, "site-01"),
        ({"clients": {"site-01": entry([1], {"a": 1.0})}}, "site-01"),
        ({"clients": {"site-01": entry([1], {"a": -1, "b": 2})}}, "site-01"),
        ({"clients": {"site-01": entry([1, 2], {"a": 3})}}, "site-01"),
        ({"clients": {"site-01": entry([1], {"a": 1})}, "meta": {"alpha": 1}}, "meta"),
        (
            {
                "clients": {"site-01": entry([1], {"a": 1})},
                "meta": {"alpha": 1, "seed": 0, "min_size": 1, "num_clients": 2, "num_samples": 1},
            },
            "meta",
        ),
    ],
)
def test_load_rejects_bad_structure(tmp_path, obj, needle: str) -> None:
    path = write_json(tmp_path, obj)
    with pytest.raises(DataError, match=needle) as info:
        load_partition(path)
    assert "bad.json" in str(info.value)


def test_load_rejects_duplicate_client_key(tmp_path) -> None:
    path = tmp_path / "dup.json"
    path.write_text(
        '{"clients": {"site-01": {"question_ids": [1], "answer_counts": {"a": 1}},'
        ' "site-01": {"question_ids": [2], "answer_counts": {"a": 1}}}}'
    )
    with pytest.raises(DataError, match="site-01"):
        load_partition(path)


def test_load_missing_and_invalid_json(tmp_path) -> None:
    with pytest.raises(DataError, match="missing.json"):
        load_partition(tmp_path / "missing.json")
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="broken.json"):
        load_partition(path)


# ------------------------------------------------------------------------------ stats


def test_partition_stats_fields() -> None:
    part, _ = small_partition(alpha=0.0, k=4)
    stats = partition_stats(part)
    assert stats["num_clients"] == 4
    assert stats["num_samples"] == len(LABELS)
    assert stats["size_min"] == 500 and stats["size_max"] == 500
    assert stats["size_mean"] == pytest.approx(500.0)
    assert stats["num_answers"] == len(set(LABELS))
    assert 0.0 <= stats["mean_tv_distance"] <= stats["max_tv_distance"] <= 1.0


def test_partition_stats_extremes() -> None:
    disjoint = Partition(
        clients={"site-01": (1, 2), "site-02": (3, 4), "site-03": ()},
        answer_counts={"site-01": {"a": 2}, "site-02": {"b": 2}, "site-03": {}},
    )
    stats = partition_stats(disjoint)
    assert stats["mean_tv_distance"] == pytest.approx(0.5)
    assert stats["empty_clients"] == 1
    same = Partition(
        clients={"site-01": (1, 2), "site-02": (3, 4)},
        answer_counts={"site-01": {"a": 1, "b": 1}, "site-02": {"a": 1, "b": 1}},
    )
    assert partition_stats(same)["mean_tv_distance"] == pytest.approx(0.0)
