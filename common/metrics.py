"""The evaluation protocol's arithmetic (docs/paper.md §4).

Per client: Local (own test split), Base (full base-class test set), Novel (novel class
names, full novel test set), and Base-other (the base test images of other clients' classes:
Base without the client's own classes, which Local already covers). Across clients: unweighted means, then the harmonic means of
those means: HM3 = HM(Local, Base, Novel), which is what the paper's averaged "HM" fits,
and HM2 = HM(Base, Novel), the usual base-to-novel HM. For domain shift: mean Local per domain.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

METRICS = ("local", "base", "novel")


def harmonic_mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("harmonic mean of no values")
    if any(v < 0 for v in values):
        raise ValueError(f"harmonic mean needs non-negative values, got {list(values)}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def summarize(per_client: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted means over clients of every metric present, plus HM3 and HM2 when defined."""
    summary: dict[str, float] = {}
    # In client order: a float sum depends on its order, and replies arrive in any order.
    rows = [per_client[client] for client in sorted(per_client)]
    for metric in sorted({m for row in rows for m in row}):
        values = [row[metric] for row in rows if metric in row]
        summary[metric] = sum(values) / len(values)
    if all(m in summary for m in METRICS):
        summary["hm3"] = harmonic_mean([summary["local"], summary["base"], summary["novel"]])
    if "base" in summary and "novel" in summary:
        summary["hm2"] = harmonic_mean([summary["base"], summary["novel"]])
    return summary


def per_domain_means(per_client: Mapping[int, Mapping[str, float]], domains: Mapping[int, str], metric: str = "local") -> dict[str, float]:
    grouped: dict[str, list[float]] = defaultdict(list)
    for client, row in sorted(per_client.items()):
        if metric in row and client in domains:
            grouped[domains[client]].append(row[metric])
    return {domain: sum(v) / len(v) for domain, v in sorted(grouped.items())}


def clients_in_mean(counted: Mapping[int, Mapping[str, float]]) -> dict[str, int]:
    """How many clients each metric's mean is taken over."""
    return {m: sum(m in row for row in counted.values()) for m in sorted({m for row in counted.values() for m in row})}


def markdown_table(
    per_client: Mapping[int, Mapping[str, float]],
    summary: Mapping[str, float],
    domains: Mapping[int, str] | None = None,
    excluded: Mapping[int, str] | None = None,
) -> str:
    """Per-client rows, a mean row over the clients not ``excluded`` (client -> why) and the
    number of clients behind each mean; accuracies in percent."""
    excluded = excluded or {}
    metrics = [m for m in (*METRICS, "base-other", "val") if m in summary]
    extra = [m for m in ("hm3", "hm2") if m in summary]
    head = ["client", *(["domain"] if domains else []), *metrics, *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for client in sorted(per_client):
        row = per_client[client]
        name = f"{client} (not in mean: {excluded[client]})" if client in excluded else str(client)
        cells = [name, *([domains.get(client, "")] if domains else [])]
        cells += [_pct(row.get(m)) for m in metrics] + [""] * len(extra)
        lines.append("| " + " | ".join(cells) + " |")
    mean = ["**mean**", *([""] if domains else []), *(_pct(summary.get(m)) for m in (*metrics, *extra))]
    lines.append("| " + " | ".join(mean) + " |")
    counts = clients_in_mean({c: r for c, r in per_client.items() if c not in excluded})
    count_row = ["clients in mean", *([""] if domains else []), *(str(counts.get(m, 0)) for m in metrics), *[""] * len(extra)]
    lines.append("| " + " | ".join(count_row) + " |")
    return "\n".join(lines)


def csv_rows(
    per_client: Mapping[int, Mapping[str, float]], summary: Mapping[str, float], excluded: Mapping[int, str] | None = None
) -> Iterable[list[str]]:
    """A row per client (``in-mean`` 0 for the excluded ones), then the means."""
    excluded = excluded or {}
    columns = [m for m in (*METRICS, "base-other", "val", "hm3", "hm2") if m in summary]
    yield ["client", *columns, "in-mean"]
    for client in sorted(per_client):
        yield [str(client), *(_num(per_client[client].get(m)) for m in columns), "0" if client in excluded else "1"]
    yield ["mean", *(_num(summary.get(m)) for m in columns), ""]


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"
