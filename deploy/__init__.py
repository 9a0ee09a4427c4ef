"""Deployment tools that the cae-stream image runs next to the worker and the trainer.

`python -m deploy.init_topics` (compose's one-shot topic initialiser), and for the demo
profile `python -m deploy.demo_producer` and `python -m deploy.alert_consumer`. They read
the broker connection from KAFKA_* (worker.settings.KafkaSettings), like the worker.
"""
