"""The worker behind a delayed link: the broker advertises a TCP proxy that forwards
every chunk `delay` ms late in each direction (tests/integration/tcp_proxy.py), so
every round trip of every client (fetch, produce, commit, transaction) pays 2 × delay.

Per delay, over one pre-filled float32 topic (one consumer group per loop):

* worker, at-least-once   `python -m worker`, defaults (pipelined)
* worker, exactly-once    `python -m worker`, WORKER_DELIVERY=exactly-once
* passthrough             the ceiling: poll, decode, send, commit_async, never
                          waiting for an acknowledgement (tests/bench/_worker_clients.py)

The worker's loops and the passthrough run in `rounds` rounds that take turns (the
order reversed every other round); each rate is the median of its rounds.

`baseline_repo` adds "worker, at-least-once (baseline)" and "worker, exactly-once
(baseline)": `python -m worker` from another checkout (the same loop before a
change), against the same topic.

With `latency_s`, per delay also the end-to-end latency (measure_latency: every
event's arrival at a test consumer minus its input's CreateTime, WORKER_EMIT=all):

* worker, {mode}, emit=all   the capacity with an event per record (30 000 records)
* latency of each mode       at `latency_share` of that capacity (half by default),
                             for `latency_s` seconds;
                             exactly-once read with isolation_level=read_committed
* latency of the passthrough at the at-least-once rate, threshold 0 (an event per
                             record) and WORKER_MAX_BATCH_WAIT_MS=0 (each poll
                             forwarded at once): the transport's own latency, the
                             floor that `loop_added` subtracts

in `latency_rounds` rounds that take turns; each figure is the median over the rounds,
and what a loop adds is the median of its difference from the passthrough of the same
round (one run of each read 10–30 ms apart between runs of one tree).

and at 0 ms "passthrough, no proxy": the passthrough against a second broker with
no proxy in front of it, so the proxy can be shown not to be the bottleneck; and
"proxy_check": PROXY_REPEATS more of each, alternating, so that the ratio of their
medians is not one noisy run against another.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from statistics import median

from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from deploy.embedded_broker import EmbeddedBroker, free_port
from tests.bench._worker_measure import (
    CLIENTS,
    Probe,
    log,
    measure_latency,
    median_run,
    rounds_order,
    run_group,
    worker_env,
)
from tests.bench.common import REPO
from tests.integration.tcp_proxy import TcpProxy

TOPIC = "in-delay"
LOOPS = ("worker, at-least-once", "worker, exactly-once", "passthrough")


MODES = {"at-least-once": "worker, at-least-once", "exactly-once": "worker, exactly-once"}
NO_PROXY = "passthrough, no proxy"
CAPACITY_RECORDS = 30_000
PROXY_REPEATS = 3
BATCH_WAIT_MS = 20  # WORKER_MAX_BATCH_WAIT_MS, the default these loops run with
COMMIT_INTERVAL_MS = 100  # WORKER_COMMIT_INTERVAL_MS under exactly-once, the default
# Under exactly-once a record is visible (read_committed) once its transaction's end is
# through: after its output's produce, TxnOffsetCommit (after AddOffsetsToTxn; both
# may overlap the produce) and then EndTxn, which waits for every output: two round
# trips more than at-least-once's one, which are the protocol's, not the loop's.
TXN_END_ROUND_TRIPS = 2


def run_delayed(
    delays_ms: list[float],
    data: Path,
    model_dir: Path,
    threshold: float,
    tmp: Path,
    baseline_repo: str | None = None,
    latency_s: float | None = None,
    baseline_first: bool = False,
    latency_rounds: int = 1,
    latency_share: float = 0.5,
    rounds: int = 1,
) -> dict:
    """{delay_ms: {loop: run_group result}} on a broker of its own behind a proxy; with
    latency_s also {delay_ms: {"latency": ...}}, each the median of `latency_rounds`;
    baseline_first times the baseline loops before the others."""
    proxy_port = free_port()
    with (
        EmbeddedBroker(advertised_port=proxy_port, log_path=tmp / "tansu-delay.log") as broker,
        EmbeddedBroker(log_path=tmp / "tansu-direct.log") as direct,
    ):
        proxy = TcpProxy(broker.port, proxy_port).forward()
        try:
            run = _DelayRun(broker, direct, proxy, data, model_dir, threshold, tmp, baseline_repo)
            run.baseline_first = baseline_first
            run.latency_rounds = latency_rounds
            run.latency_share = latency_share
            run.rounds = rounds
            return run.all(delays_ms, latency_s)
        finally:
            proxy.close()


class _DelayRun:
    def __init__(self, broker, direct, proxy, data, model_dir, threshold, tmp, baseline_repo):
        self.broker, self.direct, self.proxy, self.tmp = broker, direct, proxy, tmp
        self.data, self.model_dir, self.threshold = data, model_dir, threshold
        self.baseline_repo = baseline_repo
        self.baseline_first = False
        self.latency_rounds = 1
        self.latency_share = 0.5
        self.rounds = 1

    def all(self, delays_ms: list[float], latency_s: float | None) -> dict:
        self.admin = KafkaAdminClient(bootstrap_servers=self.broker.bootstrap)  # the proxy
        self.direct_admin = KafkaAdminClient(bootstrap_servers=self.direct.bootstrap)
        try:
            self.n = self._fill(self.admin, self.broker.bootstrap)
            self._fill(self.direct_admin, self.direct.bootstrap)
            return {str(d): self.at(d, latency_s) for d in delays_ms}
        finally:
            self.admin.close()
            self.direct_admin.close()

    def _fill(self, admin: KafkaAdminClient, bootstrap: str) -> int:
        admin.create_topics([NewTopic(TOPIC, 1, 1), NewTopic(f"{TOPIC}.dlq", 1, 1)])
        fill = subprocess.run(
            [*CLIENTS, "fill", bootstrap, str(self.data), TOPIC, "float32"],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        return json.loads(fill.stdout.decode().strip().splitlines()[-1])["records"]

    def env(self, bootstrap: str, topic: str, out: str, group: str, max_records, emit: str):
        return worker_env(bootstrap, self.model_dir, topic, out, group, max_records, emit)

    def at(self, delay: float, latency_s: float | None) -> dict:
        self.proxy.delay_s = delay / 1000  # connections opened from now on
        baselines = [f"{kind} (baseline)" for kind in MODES.values()]
        loops = [*LOOPS, *(baselines if self.baseline_repo else [])]
        if self.baseline_first:  # the other order, to see what the order itself does
            loops = [*(baselines if self.baseline_repo else []), *LOOPS]
        if delay == 0:
            loops.append(NO_PROXY)
        if latency_s:
            loops += [f"{kind}, emit=all" for kind in MODES.values()]
        # the worker's modes against the passthrough in rounds that take turns (medians);
        # the capacity runs and the passthrough without the proxy once
        paired = [k for k in loops if k in LOOPS or k.endswith("(baseline)")]
        runs: dict[str, list[dict]] = {k: [] for k in paired}
        for i, kind in rounds_order(paired, self.rounds):
            runs[kind].append(self.throughput(delay, kind, f"-r{i}" if self.rounds > 1 else ""))
        out: dict = {k: median_run(runs[k]) for k in paired}
        out |= {k: self.throughput(delay, k) for k in loops if k not in paired}
        if delay == 0:
            out["proxy_check"] = self.proxy_check()
        if latency_s:
            out["latency"] = self.latency(delay, out, latency_s)
        return out

    def proxy_check(self) -> dict:
        """The passthrough through the proxy (0 ms) and without it, alternating."""
        rates: dict[str, list[float]] = {"passthrough": [], NO_PROXY: []}
        for i in range(PROXY_REPEATS):
            for kind in rates:
                r = self.throughput(0, kind, suffix=f"-check{i}")
                rates[kind].append(r["records_per_s"])
        medians = {k: float(sorted(v)[len(v) // 2]) for k, v in rates.items()}
        return {
            "records_per_s": rates,
            "medians": medians,
            "through_proxy_over_without": medians["passthrough"] / medians[NO_PROXY],
        }

    def throughput(self, delay: float, kind: str, suffix: str = "") -> dict:
        slug = f"d{delay:g}-" + re.sub(r"[^a-z0-9.]+", "-", kind).strip("-") + suffix
        direct = kind == NO_PROXY
        admin = self.direct_admin if direct else self.admin
        bootstrap = (self.direct if direct else self.broker).bootstrap
        admin.create_topics([NewTopic(f"{slug}-events", 1, 1)])
        emit_all = kind.endswith("emit=all")
        n = min(self.n, CAPACITY_RECORDS) if emit_all else self.n
        env = self.env(
            bootstrap, TOPIC, f"{slug}-events", slug, n, "all" if emit_all else "anomalies"
        )
        if kind.startswith("passthrough"):
            cmd = [*CLIENTS, "passthrough", str(self.threshold)]
        elif kind.endswith("(baseline)"):
            run = f"import runpy, sys; sys.path.insert(0, {str(self.baseline_repo)!r}); "
            run += "runpy.run_module('worker', run_name='__main__', alter_sys=True)"
            cmd = [sys.executable, "-c", run]
        else:
            cmd = [sys.executable, "-m", "worker"]
        if "exactly-once" in kind:
            env["WORKER_DELIVERY"] = "exactly-once"
        log(f"delay {delay:g} ms each way, {kind}{suffix}: {n} records")
        broker = self.direct if direct else self.broker
        r = run_group(slug, [(cmd, env)], Probe(admin, slug, TOPIC), n, self.tmp, broker._proc.pid)
        log(
            f"delay {delay:g} ms, {kind}: {r['records_per_s']:,.0f} records/s, "
            f"{r['cpu_us_per_record']:.1f} us cpu/record"
        )
        return r

    def latency(self, delay: float, loops: dict, seconds: float) -> dict:
        """Per mode at `latency_share` (half by default) of its emit=all capacity, and
        the passthrough's floor at the at-least-once rate, in `latency_rounds` rounds
        that take turns (the order is reversed every other round); what the loop adds
        over the floor of its own round against its bound. Each figure is the median
        over the rounds."""
        ctx = {
            "bootstrap": self.broker.bootstrap,
            "create": lambda topics: self.admin.create_topics([NewTopic(t, 1, 1) for t in topics]),
            "env": lambda topic, out, group, max_records, emit: self.env(
                self.broker.bootstrap, topic, out, group, max_records, emit
            ),
            "logdir": self.tmp,
        }
        share = self.latency_share
        rates = {
            m: round(loops[f"{k}, emit=all"]["records_per_s"] * share) for m, k in MODES.items()
        }
        runs: dict[str, list[dict]] = {m: [] for m in (*MODES, "passthrough")}
        for rnd, name in rounds_order(list(runs), self.latency_rounds):
            runs[name].append(self._latency_run(ctx, delay, name, rates, seconds, rnd))
        floor = _median_run(runs["passthrough"])
        out: dict = {}
        for mode in MODES:
            # one batch deadline plus one round trip; under exactly-once an event is
            # visible (read_committed) once its transaction commits: plus one interval
            # and the transaction end's own round trips
            bound = BATCH_WAIT_MS + 2 * delay
            if mode == "exactly-once":
                bound += COMMIT_INTERVAL_MS + TXN_END_ROUND_TRIPS * 2 * delay
            r = out[mode] = _median_run(runs[mode])
            pairs = list(zip(runs[mode], runs["passthrough"], strict=True))
            added = {q: median([w[q] - f[q] for w, f in pairs]) for q in ("p50_ms", "p99_ms")}
            r["loop_added"] = {
                **added,
                "rounds_p50_ms": [w["p50_ms"] - f["p50_ms"] for w, f in pairs],
                "bound_ms": bound,
                "within_bound_p50": added["p50_ms"] <= bound,
            }
            log(
                f"delay {delay:g} ms, latency {mode}: p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} "
                f"ms (passthrough {floor['p50_ms']:.1f} / {floor['p99_ms']:.1f}); loop adds "
                f"{added['p50_ms']:.1f} ms at p50 (median of {len(pairs)} rounds), "
                f"bound {bound:g} ms"
            )
        out["passthrough"] = floor
        return out

    def _latency_run(
        self, ctx: dict, delay: float, name: str, rates: dict, seconds: float, rnd: int
    ) -> dict:
        label = f"d{delay:g}-{name}-r{rnd}"
        if name == "passthrough":
            log(f"delay {delay:g} ms, latency passthrough: {rates['at-least-once']} records/s")
            return measure_latency(
                ctx,
                "float32",
                self.data,
                rates["at-least-once"],
                seconds,
                label,
                {"WORKER_MAX_BATCH_WAIT_MS": "0"},  # no batching: forward every poll at once
                cmd=[*CLIENTS, "passthrough", "0"],  # max |x| >= 0: an event for every record
            )
        extra = {"WORKER_DELIVERY": name} if name == "exactly-once" else {}
        log(f"delay {delay:g} ms, latency {name}: {rates[name]} records/s for {seconds} s")
        return measure_latency(
            ctx,
            "float32",
            self.data,
            rates[name],
            seconds,
            label,
            extra,
            isolation_level="read_committed" if name == "exactly-once" else "read_uncommitted",
        )


def _median_run(runs: list[dict]) -> dict:
    """The run of the median p50 (its other figures), with p50 and p99 the medians over
    the runs and each run's p50 and p99 under "rounds"."""
    r = dict(sorted(runs, key=lambda x: x["p50_ms"])[(len(runs) - 1) // 2])
    r["rounds"] = [{"p50_ms": x["p50_ms"], "p99_ms": x["p99_ms"]} for x in runs]
    r["p50_ms"] = median([x["p50_ms"] for x in runs])
    r["p99_ms"] = median([x["p99_ms"] for x in runs])
    return r


def delay_ratios(delayed: dict) -> list[tuple[str, float]]:
    """worker / passthrough per delay and mode, each loop's rate against its own at 0 ms,
    and the passthrough through the proxy at 0 ms against the one without it."""
    rows = []
    base = delayed.get("0") or delayed.get("0.0") or {}
    for delay, loops in delayed.items():
        ceiling = loops["passthrough"]["records_per_s"]
        timed = {k: r for k, r in loops.items() if k in LOOPS or k.endswith("(baseline)")}
        for kind, r in timed.items():
            if kind != "passthrough":
                rows.append(
                    (f"delay {delay} ms: {kind} / passthrough", r["records_per_s"] / ceiling)
                )
        for kind, r in timed.items():
            if base.get(kind) and delay not in ("0", "0.0"):
                rows.append(
                    (
                        f"delay {delay} ms / 0 ms: {kind}",
                        r["records_per_s"] / base[kind]["records_per_s"],
                    )
                )
    if NO_PROXY in base:
        rows.append(
            (
                "0 ms: passthrough through the proxy / without it",
                base["passthrough"]["records_per_s"] / base[NO_PROXY]["records_per_s"],
            )
        )
    if "proxy_check" in base:
        rows.append(
            (
                f"0 ms: passthrough through the proxy / without it, medians of "
                f"{PROXY_REPEATS} alternating runs",
                base["proxy_check"]["through_proxy_over_without"],
            )
        )
    return rows
