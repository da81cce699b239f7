"""Evaluation arithmetic on known inputs (docs/paper.md §4)."""

from __future__ import annotations

import csv
import io

import pytest

from common.metrics import csv_rows, harmonic_mean, markdown_table, per_domain_means, summarize


def test_harmonic_mean_known_values() -> None:
    assert harmonic_mean([0.5, 0.5]) == pytest.approx(0.5)
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.9, 0.6, 0.3]) == pytest.approx(3 / (1 / 0.9 + 1 / 0.6 + 1 / 0.3))
    assert harmonic_mean([0.8, 0.0]) == 0.0
    with pytest.raises(ValueError, match="no values"):
        harmonic_mean([])


def test_summary_is_unweighted_mean_then_hm_of_means() -> None:
    per_client = {
        0: {"local": 1.0, "base": 0.6, "novel": 0.5},
        1: {"local": 0.8, "base": 0.8, "novel": 0.7},
    }
    s = summarize(per_client)
    assert (s["local"], s["base"], s["novel"]) == pytest.approx((0.9, 0.7, 0.6))
    assert s["hm3"] == pytest.approx(3 / (1 / 0.9 + 1 / 0.7 + 1 / 0.6))
    assert s["hm2"] == pytest.approx(2 / (1 / 0.7 + 1 / 0.6))
    # The paper's averaged HM is HM of the means, not the mean of per-client HMs.
    per_client_hm = [harmonic_mean([r["local"], r["base"], r["novel"]]) for r in per_client.values()]
    assert s["hm3"] != pytest.approx(sum(per_client_hm) / 2)


def test_local_only_schemes_have_no_hm() -> None:
    s = summarize({0: {"local": 0.4}, 1: {"local": 0.6}})
    assert s == pytest.approx({"local": 0.5})


def test_per_domain_means() -> None:
    per_client = {0: {"local": 0.2}, 1: {"local": 0.4}, 2: {"local": 0.9}, 3: {"local": 0.7}}
    domains = {0: "clipart", 1: "clipart", 2: "real", 3: "real"}
    assert per_domain_means(per_client, domains) == pytest.approx({"clipart": 0.3, "real": 0.8})


def test_tables_show_clients_and_mean() -> None:
    per_client = {1: {"local": 0.5, "base": 0.25, "novel": 0.75}, 0: {"local": 1.0, "base": 0.5, "novel": 0.25}}
    s = summarize(per_client)
    md = markdown_table(per_client, s).splitlines()
    assert md[0] == "| client | local | base | novel | hm3 | hm2 |"
    assert md[2].startswith("| 0 | 100.00 | 50.00 | 25.00 |")
    assert md[-2].startswith("| **mean** | 75.00 | 37.50 | 50.00 |")
    assert md[-1].startswith("| clients in mean | 2 | 2 | 2 |")
    rows = list(csv.reader(io.StringIO("\n".join(",".join(r) for r in csv_rows(per_client, s)))))
    assert rows[0] == ["client", "local", "base", "novel", "hm3", "hm2", "in-mean"]
    assert [r[0] for r in rows[1:]] == ["0", "1", "mean"]
    assert float(rows[-1][1]) == pytest.approx(0.75)


def test_tables_list_excluded_clients_but_leave_them_out_of_the_mean() -> None:
    per_client = {0: {"local": 1.0, "base": 0.5, "novel": 0.5}, 1: {"local": 0.5, "base": 0.5, "novel": 0.5}, 2: {"local": 0.0, "base": 0.0, "novel": 0.0}}
    excluded = {2: "never trained in this run"}
    s = summarize({c: r for c, r in per_client.items() if c not in excluded})
    md = markdown_table(per_client, s, excluded=excluded).splitlines()
    assert md[4].startswith("| 2 (not in mean: never trained in this run) | 0.00 |")
    assert md[-2].startswith("| **mean** | 75.00 | 50.00 | 50.00 |")
    assert md[-1].startswith("| clients in mean | 2 | 2 | 2 |")
    rows = list(csv.reader(io.StringIO("\n".join(",".join(r) for r in csv_rows(per_client, s, excluded)))))
    assert [r[-1] for r in rows[1:4]] == ["1", "1", "0"]
