"""The demo's end (deploy/demo.py): record- and episode-level figures, per phase of the
stream, the drift loop's timings, `summary.json` and the PNG timeline."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import orjson

from deploy import demo_drift
from deploy.sensor_stream import KINDS

if TYPE_CHECKING:
    from deploy.demo import Seen
    from deploy.demo_drift import LoopLog

SAMPLE_MS = 1_000  # event time between two readings of one machine
T_START_MS = 1_764_230_400_000  # event time of the first readings (2025-11-27 08:00 UTC)
TARGET_FPR = 0.01  # the trainer's default target, which every model of the demo keeps


def opened_at_ms(messages: list[dict]) -> int:
    """An incident's opening: the event time of the row that opened it, as its first
    message (the lowest sequence) gives it."""
    return min(messages, key=lambda m: m["sequence"])["updated_at_ms"]


def episode_report(incidents: dict[str, list[dict]], episodes: dict) -> dict:
    """Episode-level detection: an incident matches an episode of its key when its
    [started_at, ended_at] event-time span overlaps the episode's rows (an open
    incident: up to its latest update). Spikes (one record) cannot open an incident
    and are left out."""
    last = {iid: max(msgs, key=lambda m: m["sequence"]) for iid, msgs in incidents.items()}
    opened = {iid: opened_at_ms(msgs) for iid, msgs in incidents.items()}
    spans = [
        (m["key"], m["started_at_ms"], m["ended_at_ms"] or m["updated_at_ms"], iid)
        for iid, m in last.items()
    ]
    matched: set[str] = set()
    detected, exactly_one, to_open, total = 0, 0, [], 0
    by_kind: dict[str, list[int]] = {}  # kind → [detected, episodes]
    for key, eps in episodes.items():
        for ep in eps:
            if ep.length < 2:
                continue
            total += 1
            kind = by_kind.setdefault(ep.kind, [0, 0])
            kind[1] += 1
            lo = T_START_MS + ep.start * SAMPLE_MS
            hi = T_START_MS + (ep.start + ep.length - 1) * SAMPLE_MS
            hits = [iid for k, a, b, iid in spans if k == key and a <= hi and b >= lo]
            matched.update(hits)
            if hits:
                detected += 1
                kind[0] += 1
                exactly_one += len(hits) == 1
                to_open.append((min(opened[i] for i in hits) - lo) / 1000)
    return {
        "episodes": total,
        "detected": detected,
        "exactly_one": exactly_one,
        "false_incidents": len(last) - len(matched),
        "incidents": len(last),
        "detected_by_kind": {k: by_kind[k] for k in sorted(by_kind)},
        "time_to_open_s": to_open,
    }


def before(incidents: dict[str, list[dict]], episodes: dict, shift_ms: int) -> tuple[dict, dict]:
    """The incidents and episodes of the first act: incidents that opened before the
    shift's event time (the event time of their first message's opening row; one that
    shifted rows opened belongs to the second act even when its window reached back
    before the shift) and episodes that started before it."""
    return (
        {iid: msgs for iid, msgs in incidents.items() if opened_at_ms(msgs) < shift_ms},
        {
            k: [e for e in eps if T_START_MS + e.start * SAMPLE_MS < shift_ms]
            for k, eps in episodes.items()
        },
    )


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


def summarise(
    args,
    out,
    seen: Seen,
    loop_log: LoopLog,
    labels,
    kinds,
    episodes,
    stream_s,
    half,
    shift_at,
    v1,
    new_version,
    worker_code,
    total_s,
    machines: int,
) -> int:
    """Prints the summary, writes summary.json and the timeline; 0 when every record was
    scored, the processes exited cleanly, the reload and (with a drift act) the loop
    were seen, else 1."""
    n = len(labels)
    scores = np.full(n, np.nan)
    for i, s in seen.score.items():
        scores[i] = s
    flagged = np.zeros(n, dtype=bool)
    flagged[list(seen.flagged)] = True
    whole = detection(flagged, labels, np.ones(n, dtype=bool))
    fp = whole["false_alarms"]
    lat = np.asarray(seen.latency_ms)
    versions = [seen.version.get(i, "") for i in range(n)]
    seen_versions = list(dict.fromkeys(v for v in versions if v))
    with seen.lock:
        incidents, drift_msgs = dict(seen.incidents), list(seen.drift)
    inc = episode_report(incidents, episodes)
    inc_before = None
    if shift_at is not None:  # the per-key incidents of the first act alone
        shift_ms = T_START_MS + -(-shift_at // machines) * SAMPLE_MS  # the shift's event time
        inc_before = episode_report(*before(incidents, episodes, shift_ms))
    loop = drift_loop(seen, loop_log, drift_msgs, shift_at, n) if shift_at is not None else None
    parts = phases(n, shift_at, versions, loop and loop["retrained"])
    figures = {p.name: detection(flagged, labels, p.rows) for p in parts}
    models = {
        p.name: " → ".join(v[-6:] for v in dict.fromkeys(np.asarray(versions)[p.rows]) if v) or "-"
        for p in parts
    }
    tto = np.asarray(inc["time_to_open_s"])
    open_text = (
        f"median {np.median(tto):.0f} s, max {tto.max():.0f} s"
        if len(tto)
        else "no incident opened"
    )
    png = out / "timeline.png"
    marks = [(half, "retrained model published", "tab:green")]
    if loop is not None:
        marks.append((shift_at, "new operating point", "tab:orange"))
        if loop["promoted_at_record"] is not None:
            marks.append((loop["promoted_at_record"], "retrained on drift, promoted", "tab:purple"))
    plot(png, scores, labels, versions, seen.threshold, marks)
    by_kind = []
    for kind in KINDS:
        mask = np.asarray([k == kind for k in kinds])
        if mask.any():
            by_kind.append(f"{kind} {flagged[mask].mean():.0%}")
    normal = n - int(labels.sum())
    lines = [
        "",
        "── summary " + "─" * 60,
        f"records scored         {len(seen.score)} of {n} (worker exit code {worker_code})",
        f"alerts                 {whole['alerts']}: {whole['true_alerts']} true, {fp} false alarms ({fp / max(1, normal):.2%} of normal rows)",
        f"precision / recall / F1  {whole['precision']:.3f} / {whole['recall']:.3f} / {whole['f1']:.3f}   (labelled rows: {int(labels.sum())})",
        f"recall by kind         {', '.join(by_kind)}",
    ]
    if loop is not None:
        lines += ["per phase of the stream"] + ["  " + ln for ln in phase_lines(figures, models)]
    lines += [
        f"throughput             {n / stream_s:.0f} records/s sustained (producer rate {args.rate}/s)",
        f"end-to-end latency     p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms"
        if len(lat)
        else "latency: no events",
        f"incidents              {inc['incidents']}: {inc['detected']} of {inc['episodes']} multi-record episodes detected "
        f"({inc['exactly_one']} by exactly one incident), {inc['false_incidents']} false "
        f"({inc['false_incidents'] / max(1e-9, normal / 10_000):.2f} per 10 000 normal records)"
        + (
            f"; before the shift {inc_before['detected']} of {inc_before['episodes']}, "
            f"{inc_before['false_incidents']} false"
            if inc_before
            else ""
        ),
        "episodes detected      "
        + ", ".join(f"{k} {d}/{t}" for k, (d, t) in inc["detected_by_kind"].items()),
        f"time to open           {open_text}   (event time from the episode's first record; spikes are single records: alerts, not incidents)",
        f"model versions seen    {' → '.join(seen_versions)}"
        + ("  (hot reload ✓)" if len(seen_versions) > 1 else ""),
    ]
    if loop is not None:
        lines += loop_lines(loop, shift_at)
    lines += [f"timeline               {png}", f"total time             {total_s:.0f} s"]
    print("\n".join(lines))
    summary = {
        "records": n,
        "scored": len(seen.score),
        "precision": whole["precision"],
        "recall": whole["recall"],
        "f1": whole["f1"],
        "throughput_rps": n / stream_s,
        "latency_p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "latency_p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "versions": seen_versions,
        "incidents": {k: v for k, v in inc.items() if k != "time_to_open_s"},
        "time_to_open_s_median": float(np.median(tto)) if len(tto) else None,
        "incidents_before_shift": inc_before
        and {k: v for k, v in inc_before.items() if k != "time_to_open_s"},
        "phases": figures,
        "drift": loop,
    }
    (out / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    failed = []
    if len(seen.score) != n:
        failed.append("not every record was scored")
    if worker_code != 0:
        failed.append("the worker or the trainer did not exit cleanly")
    if len(seen_versions) < 2:
        failed.append(
            f"no reload was seen (the half-way checkpoint serves after "
            f"{demo_drift.SHADOW_RECORDS} rows in shadow)"
        )
    if loop is not None and not loop["complete"]:
        failed.append(
            "the drift loop did not run to its end (opened, retrained, promoted, resolved)"
        )
    if failed:
        print(f"demo FAILED: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def drift_loop(seen: Seen, loop_log: LoopLog, drift_msgs: list, shift_at: int, n: int) -> dict:
    """The drift act's steps and timings, measured from the first shifted record's
    sending (wall clock)."""
    t_shift = float(seen.sent_at_ms[shift_at])
    sent = seen.sent_at_ms[shift_at:n]

    def records_by(ms: float) -> int:  # shifted records sent by then
        return int(np.count_nonzero(sent <= ms))

    opens = [m for _, m in drift_msgs if m["status"] == "open"]
    before = [m for m in opens if m["started_at_ms"] < t_shift]
    opened = next((m for m in opens if m["started_at_ms"] >= t_shift), None)
    resolved = next(
        (
            m
            for _, m in drift_msgs
            if opened and m["status"] == "resolved" and m["incident_id"] == opened["incident_id"]
        ),
        None,
    )
    published = [e["version"] for _, e in loop_log.find("trainer", "published")]
    retrained = next((v for v in published if v in seen.first_seen_ms), None)
    verdicts = {
        e["version"]: ("promoted", e["detail"])
        for _, e in loop_log.find("worker", "shadow_promoted")
    }
    for _, e in loop_log.find("worker", "model_refused"):
        verdicts.setdefault(e["version"], (f"refused: {e['reason']}", e.get("detail")))
    promoted_ms = seen.first_seen_ms.get(retrained) if retrained else None
    promoted_at = None
    if retrained:
        scored_by = [i for i, v in seen.version.items() if v == retrained and i >= shift_at]
        promoted_at = min(scored_by) if scored_by else None
    since = lambda ms: None if ms is None else round((ms - t_shift) / 1000, 1)  # noqa: E731
    return {
        "shift_at_record": shift_at,
        "shift": demo_drift.shift_text(),
        "false_openings_before_shift": len(before),
        "opened_after_records": records_by(opened["started_at_ms"]) if opened else None,
        "opened_after_s": since(opened and opened["started_at_ms"]),
        "opened_statistic": opened and opened["statistic"],
        "published": published,
        "retrained": retrained,
        "published_after_s": since(
            next((ms for ms, e in loop_log.find("trainer", "published", version=retrained)), None)
        ),
        "shadow_verdicts": {v: list(verdicts.get(v, ("none", None))) for v in published},
        "promoted_after_s": since(promoted_ms),
        "promoted_at_record": promoted_at,
        "resolved_after_records": records_by(resolved["ended_at_ms"]) if resolved else None,
        "resolved_after_s": since(resolved and resolved["ended_at_ms"]),
        "complete": bool(opened and retrained and resolved)
        and verdicts.get(retrained, ("",))[0] == "promoted",
    }


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def loop_lines(loop: dict, shift_at: int) -> list[str]:
    def s(x):
        return "-" if x is None else f"{x:.1f} s"

    verdict = loop["shadow_verdicts"].get(loop["retrained"] or "", ["none", None])
    return [
        f"drift loop             {'✓ complete' if loop['complete'] else '✗ INCOMPLETE'}: at record {shift_at} "
        f"{loop['shift']}; times from the first shifted record",
        f"  drift opened         after {loop['opened_after_records']} shifted records ({s(loop['opened_after_s'])}), "
        f"T = {_num(loop['opened_statistic'])}",
        f"  retrained on drift   {loop['retrained'] or 'none served'}, published at {s(loop['published_after_s'])}"
        + (f" (trainer published {len(loop['published'])})" if len(loop["published"]) > 1 else ""),
        f"  shadow verdict       {verdict[0]}, serving at {s(loop['promoted_after_s'])}"
        + (f" (record {loop['promoted_at_record']})" if loop["promoted_at_record"] else "")
        + (f": {verdict[1]}" if verdict[1] else ""),
        f"  drift resolved       after {loop['resolved_after_records']} shifted records ({s(loop['resolved_after_s'])})",
    ] + (
        [f"  false drift openings {loop['false_openings_before_shift']} before the shift"]
        if loop["false_openings_before_shift"]
        else []
    )
