"""python -m deploy.demo_producer: synthetic feature vectors for the demo (compose `demo` profile).

Normal rows lie near a low-dimensional subspace (so an autoencoder can learn them); a
fraction --anomaly-rate of rows is pushed off it. JSON records (docs/contract.md#input-formats),
keyed by sensor. Runs until --count records (0 = forever) or SIGTERM, then flushes and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import numpy as np
import structlog
from kafka import KafkaProducer
from kafka.errors import KafkaError

from deploy.tool import start_tool, stop_on_signals
from worker.codec import encode_json
from worker.settings import KafkaSettings

log = structlog.get_logger("demo_producer")

LATENT_DIM = 3
LOG_EVERY_S = 10.0


class FeatureStream:
    """Rows x = z·W + noise (normal) or the same plus a large kick on a few features (anomaly)."""

    def __init__(self, dim: int, anomaly_rate: float, seed: int):
        self.rng = np.random.default_rng(seed)
        self.mixing = np.random.default_rng([seed, 1]).normal(
            size=(LATENT_DIM, dim)
        )  # fixed per seed
        self.dim = dim
        self.anomaly_rate = anomaly_rate

    def rows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        z = self.rng.normal(size=(n, LATENT_DIM))
        x = z @ self.mixing + 0.05 * self.rng.normal(size=(n, self.dim))
        anomalous = self.rng.random(n) < self.anomaly_rate
        for i in np.flatnonzero(anomalous):
            cols = self.rng.choice(self.dim, size=max(1, self.dim // 4), replace=False)
            x[i, cols] += self.rng.choice([-1.0, 1.0], size=cols.size) * self.rng.uniform(
                4, 8, size=cols.size
            )
        return x.astype(np.float32), anomalous


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m deploy.demo_producer", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--topic", default="features")
    p.add_argument("--rate", type=float, default=200.0, help="records per second (default 200)")
    p.add_argument(
        "--count", type=int, default=0, help="stop after N records; 0 = run until stopped"
    )
    p.add_argument("--dim", type=int, default=16, help="features per record (default 16)")
    p.add_argument("--sensors", type=int, default=50, help="distinct record keys (default 50)")
    p.add_argument("--anomaly-rate", type=float, default=0.005, help="fraction of anomalous rows")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    if args.rate <= 0 or args.dim < 2 or args.sensors < 1 or not 0 <= args.anomaly_rate <= 1:
        p.error("need --rate > 0, --dim ≥ 2, --sensors ≥ 1, 0 ≤ --anomaly-rate ≤ 1")
    return args


def run(args: argparse.Namespace, kafka: KafkaSettings, stop: threading.Event) -> int:
    producer = KafkaProducer(**kafka.client_kwargs(), acks="all", linger_ms=20, retries=5)
    stream = FeatureStream(args.dim, args.anomaly_rate, args.seed)
    sent = anomalies = 0
    tick_s = 0.1
    per_tick = max(1, round(args.rate * tick_s))
    next_tick = last_log = time.monotonic()
    try:
        while not stop.is_set() and (args.count == 0 or sent < args.count):
            n = per_tick if args.count == 0 else min(per_tick, args.count - sent)
            rows, anomalous = stream.rows(n)
            now_ms = int(time.time() * 1000)
            for i, row in enumerate(rows):
                seq = sent + i
                sensor = f"sensor-{seq % args.sensors}"
                producer.send(
                    args.topic,
                    key=sensor.encode(),
                    value=encode_json(row, id=f"{sensor}/{seq}", ts=now_ms),
                )
            sent += n
            anomalies += int(anomalous.sum())
            if time.monotonic() - last_log >= LOG_EVERY_S:
                last_log = time.monotonic()
                log.info("produced", records=sent, anomalies_injected=anomalies, topic=args.topic)
            next_tick += tick_s
            stop.wait(max(0.0, next_tick - time.monotonic()))
        producer.flush(timeout=30)
    except KafkaError as e:
        log.error("produce_failed", error=str(e) or type(e).__name__, records=sent)
        return 1
    finally:
        producer.close(timeout=10)
    log.info("producer_stopped", records=sent, anomalies_injected=anomalies, topic=args.topic)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kafka = start_tool()
    return run(args, kafka, stop_on_signals())


if __name__ == "__main__":
    sys.exit(main())
