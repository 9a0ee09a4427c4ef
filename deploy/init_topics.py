"""python -m deploy.init_topics [--partitions N] [--replication-factor R] [--model-topic T] TOPIC...

Creates the topics that do not exist yet and grows a topic that has fewer partitions than
asked. Partitions are never removed; after growing, keys map to other partitions, so grow
before producers start. A broker that refuses to grow is logged, not fatal. The model
topic (--model-topic, or WORKER_MODEL_TOPIC) is created compacted with one partition
(docs/contract.md#model-topic). Waits up to --timeout-s for the broker. Exit 0 when
every topic exists, 1 when the broker refused, 2 for a bad setting.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import structlog
from kafka import KafkaAdminClient
from kafka.admin import NewPartitions, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from deploy.tool import start_tool
from worker.settings import KafkaSettings

log = structlog.get_logger("init_topics")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m deploy.init_topics", description=__doc__.split("\n\n")[1]
    )
    p.add_argument("topics", nargs="*", metavar="TOPIC")
    p.add_argument(
        "--model-topic",
        default=os.environ.get("WORKER_MODEL_TOPIC", ""),
        help="the compacted, one-partition checkpoint topic (default: WORKER_MODEL_TOPIC, "
        "none when unset)",
    )
    p.add_argument("--partitions", type=int, default=6, help="partitions per topic (default 6)")
    p.add_argument("--replication-factor", type=int, default=1, help="(default 1)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="wait this long for the broker")
    args = p.parse_args(argv)
    if args.partitions < 1 or args.replication_factor < 1:
        p.error("--partitions and --replication-factor must be ≥ 1")
    if not args.topics and not args.model_topic:
        p.error("name at least one TOPIC or --model-topic")
    return args


def connect(kafka: KafkaSettings, timeout_s: float) -> KafkaAdminClient:
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        try:
            return KafkaAdminClient(**kafka.client_kwargs(), request_timeout_ms=15_000)
        except (KafkaError, OSError) as e:
            if time.monotonic() + delay > deadline:
                raise
            log.warning(
                "broker_unreachable",
                bootstrap=kafka.bootstrap_servers,
                error=str(e) or type(e).__name__,
                retry_in_s=delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def partition_counts(admin: KafkaAdminClient, topics: list[str]) -> dict[str, int]:
    """Partitions of each topic in `topics` that exists."""
    existing = set(admin.list_topics())
    present = [t for t in topics if t in existing]
    if not present:
        return {}
    return {d["name"]: len(d["partitions"]) for d in admin.describe_topics(present)}


def ensure_topics(
    admin: KafkaAdminClient, topics: list[str], partitions: int, replication: int
) -> dict[str, int]:
    counts = partition_counts(admin, topics)
    missing = [t for t in topics if t not in counts]
    if missing:
        try:
            admin.create_topics([NewTopic(t, partitions, replication) for t in missing])
        except TopicAlreadyExistsError:  # another initialiser won the race
            pass
        log.info(
            "topics_created", topics=missing, partitions=partitions, replication_factor=replication
        )
    short = {t: n for t, n in counts.items() if n < partitions}
    if short:
        try:
            admin.create_partitions({t: NewPartitions(partitions) for t in short})
        except KafkaError as e:  # the topics exist and serve; fewer partitions cap the workers
            log.warning(
                "partitions_not_added",
                topics=short,
                wanted=partitions,
                error=str(e) or type(e).__name__,
            )
            return counts | dict.fromkeys(missing, partitions)
        log.info("partitions_added", topics=sorted(short), before=short, partitions=partitions)
    return {t: max(n, partitions) for t, n in counts.items()} | dict.fromkeys(missing, partitions)


MODEL_TOPIC_CONFIG = {"cleanup.policy": "compact"}


def ensure_model_topic(admin: KafkaAdminClient, topic: str, replication: int) -> None:
    """The checkpoint topic: compacted, one partition (a version's chunks before its
    commit record, in order). An existing one is left as it is."""
    if topic in set(admin.list_topics()):
        return
    try:
        admin.create_topics(
            [NewTopic(topic, 1, replication, topic_configs=dict(MODEL_TOPIC_CONFIG))]
        )
    except TopicAlreadyExistsError:
        return
    log.info("model_topic_created", topic=topic, partitions=1, **MODEL_TOPIC_CONFIG)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kafka = start_tool()
    try:
        admin = connect(kafka, args.timeout_s)
        try:
            result = ensure_topics(admin, args.topics, args.partitions, args.replication_factor)
            if args.model_topic:
                ensure_model_topic(admin, args.model_topic, args.replication_factor)
                result[args.model_topic] = 1
        finally:
            admin.close()
    except (KafkaError, OSError) as e:
        log.error(
            "topic_init_failed", bootstrap=kafka.bootstrap_servers, error=str(e) or type(e).__name__
        )
        return 1
    log.info("topics_ready", topics=result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
