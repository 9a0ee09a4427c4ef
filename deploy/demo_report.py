"""The demo's end: record- and episode-level figures, per phase of the stream, the
drift loop's timings, `summary.json` and the PNG timeline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_MS = 1_000  # event time between two readings of one machine
T_START_MS = 1_764_230_400_000  # event time of the first readings (2025-11-27 08:00 UTC)
TARGET_FPR = 0.01  # the trainer's default target, which every model of the demo keeps


def episode_report(incidents: dict[str, list[dict]], episodes: dict) -> dict:
    """Episode-level detection: an incident matches an episode of its key when its
    [started_at, ended_at] event-time span overlaps the episode's rows (an open
    incident: up to its latest update). Spikes (one record) cannot open an incident
    and are left out."""
    last = {iid: max(msgs, key=lambda m: m["sequence"]) for iid, msgs in incidents.items()}
    opened = {
        iid: min(msgs, key=lambda m: m["sequence"])["updated_at_ms"]
        for iid, msgs in incidents.items()
    }
    spans = [
        (m["key"], m["started_at_ms"], m["ended_at_ms"] or m["updated_at_ms"], iid)
        for iid, m in last.items()
    ]
    matched: set[str] = set()
    detected, exactly_one, to_open, total = 0, 0, [], 0
    for key, eps in episodes.items():
        for ep in eps:
            if ep.length < 2:
                continue
            total += 1
            lo = T_START_MS + ep.start * SAMPLE_MS
            hi = T_START_MS + (ep.start + ep.length - 1) * SAMPLE_MS
            hits = [iid for k, a, b, iid in spans if k == key and a <= hi and b >= lo]
            matched.update(hits)
            if hits:
                detected += 1
                exactly_one += len(hits) == 1
                to_open.append((min(opened[i] for i in hits) - lo) / 1000)
    return {
        "episodes": total,
        "detected": detected,
        "exactly_one": exactly_one,
        "false_incidents": len(last) - len(matched),
        "incidents": len(last),
        "time_to_open_s": to_open,
    }


@dataclass(frozen=True)
class Phase:
    name: str
    rows: np.ndarray  # bool mask over the records sent


def detection(flagged: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> dict:
    """Record-level figures of the rows in `mask`."""
    f, y = flagged[mask], labels[mask] == 1
    tp, fp, fn = int((f & y).sum()), int((f & ~y).sum()), int((~f & y).sum())
    normal = int((~y).sum())
    precision = tp / max(1, tp + fp)
    recall = tp / max(1, tp + fn)
    return {
        "records": int(mask.sum()),
        "normal_rows": normal,
        "alerts": int(f.sum()),
        "true_alerts": tp,
        "false_alarms": fp,
        "false_alarm_rate": fp / normal if normal else None,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / max(1e-12, precision + recall),
    }


def phases(n: int, shift_at: int | None, versions: list[str], retrained: str | None) -> list[Phase]:
    """Before the shift; after it, still scored by a model of before; scored by the
    model retrained on drift."""
    i = np.arange(n)
    if shift_at is None:
        return [Phase("whole stream", np.ones(n, dtype=bool))]
    by_new = np.asarray([v == retrained and retrained is not None for v in versions[:n]])
    return [
        Phase("before the shift", i < shift_at),
        Phase("shifted, old model", (i >= shift_at) & ~by_new),
        Phase("after promotion", (i >= shift_at) & by_new),
    ]


def plot(
    path,
    scores: np.ndarray,
    labels: np.ndarray,
    versions: list[str],
    thresholds: dict,
    marks: list[tuple[int, str, str]],
):
    """Scores over the records; the serving model's threshold; `marks`: (record, label,
    colour) vertical lines (a reload, the shift, a promotion)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(14, 5))
    t = np.arange(len(scores))
    ok = np.isfinite(scores)
    ax.scatter(
        t[ok & (labels == 0)], scores[ok & (labels == 0)], s=2, c="tab:blue", label="normal traffic"
    )
    ax.scatter(
        t[ok & (labels == 1)],
        scores[ok & (labels == 1)],
        s=8,
        c="tab:red",
        label="injected anomaly",
    )
    for v in dict.fromkeys(versions):
        idx = np.flatnonzero(np.asarray(versions) == v)
        if len(idx) and v in thresholds:
            ax.hlines(
                thresholds[v], idx.min(), idx.max(), colors="black", linestyles="--", linewidth=1
            )
    for at, label, colour in marks:
        ax.axvline(at, color=colour, linewidth=1, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("record")
    ax.set_ylabel("anomaly score (log)")
    ax.set_title("cae-stream demo: score timeline (dashed: threshold of the serving model)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def phase_lines(figures: dict[str, dict], models: dict[str, str]) -> list[str]:
    """The per-phase table of the summary."""
    names = list(figures)
    width = max(20, *(len(n) + 2 for n in names))

    def row(title: str, cells: list[str]) -> str:
        return f"{title:23}" + "".join(f"{c:{width}}" for c in cells)

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.2%}"

    return [
        row("", names),
        row("records", [str(figures[n]["records"]) for n in names]),
        row("scored by", [models[n] for n in names]),
        row(
            "false-alarm rate",
            [
                f"{pct(figures[n]['false_alarm_rate'])} ({figures[n]['false_alarms']})"
                for n in names
            ],
        )
        + f"target {TARGET_FPR:.0%} of normal rows",
        row(
            "precision / recall",
            [f"{figures[n]['precision']:.2f} / {figures[n]['recall']:.2f}" for n in names],
        ),
    ]
