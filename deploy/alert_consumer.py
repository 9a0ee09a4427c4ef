"""python -m deploy.alert_consumer: the demo's downstream service (compose `demo` profile).

Reads anomaly events (docs/contract.md#anomaly-events) in its own group, logs one `alert` line per
event. Under at-least-once delivery an event can arrive twice; it is de-duplicated by
`event_id` (a bounded memory of recent ids). Offsets are committed after the alerts are
logged. SIGTERM: commit and exit 0.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections import OrderedDict

import orjson
import structlog
from kafka import KafkaConsumer
from kafka.errors import KafkaError

from deploy.tool import start_tool, stop_on_signals
from worker.settings import KafkaSettings

log = structlog.get_logger("alerts")


class RecentIds:
    """The last `size` ids seen, for de-duplication."""

    def __init__(self, size: int):
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def seen(self, event_id: str) -> bool:
        if event_id in self._ids:
            self._ids.move_to_end(event_id)
            return True
        self._ids[event_id] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m deploy.alert_consumer", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--topic", default="anomalies")
    p.add_argument("--group-id", default="cae-alerts")
    p.add_argument(
        "--max-events", type=int, default=0, help="stop after N alerts; 0 = run until stopped"
    )
    return p.parse_args(argv)


def alert_fields(event: dict) -> dict:
    top = event.get("top_features") or []
    return {
        "event_id": event.get("event_id"),
        "id": event.get("id"),
        "key": (event.get("source") or {}).get("key"),
        "score": event.get("score"),
        "threshold": event.get("threshold"),
        "p_value": event.get("p_value"),
        "top_features": [f.get("name") for f in top],
        "model_version": (event.get("model") or {}).get("version"),
    }


def run(args: argparse.Namespace, kafka: KafkaSettings, stop: threading.Event) -> int:
    consumer = KafkaConsumer(
        args.topic,
        **kafka.client_kwargs(),
        group_id=args.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        session_timeout_ms=10_000,
        heartbeat_interval_ms=2_000,
    )
    recent = RecentIds(100_000)
    alerts = duplicates = unreadable = 0
    try:
        while not stop.is_set() and (args.max_events == 0 or alerts < args.max_events):
            polled = consumer.poll(timeout_ms=500)
            for records in polled.values():
                for rec in records:
                    try:
                        event = orjson.loads(rec.value)
                    except orjson.JSONDecodeError:
                        unreadable += 1
                        log.warning("unreadable_event", partition=rec.partition, offset=rec.offset)
                        continue
                    if recent.seen(str(event.get("event_id"))):
                        duplicates += 1
                        continue
                    if event.get("is_anomaly", True):
                        alerts += 1
                        log.warning("alert", **alert_fields(event))
            if polled:
                consumer.commit()
    except KafkaError as e:
        log.error("consume_failed", error=str(e) or type(e).__name__)
        return 1
    finally:
        consumer.close(autocommit=False)
        log.info("alerts_stopped", alerts=alerts, duplicates=duplicates, unreadable=unreadable)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kafka = start_tool()
    return run(args, kafka, stop_on_signals())


if __name__ == "__main__":
    sys.exit(main())
