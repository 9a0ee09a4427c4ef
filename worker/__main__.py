"""python -m worker                 run the streaming worker (settings from WORKER_*/KAFKA_*)
python -m worker --check         exit 0 when the local worker is healthy (container HEALTHCHECK)
python -m worker score --model-dir DIR --data FILE --out FILE.csv   offline scoring
"""

from __future__ import annotations

import signal
import sys
import urllib.error
import urllib.request

from pydantic import ValidationError

from worker.logs import configure_logging
from worker.settings import WorkerSettings, settings_error_line


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _load_settings() -> WorkerSettings:
    return WorkerSettings()


def check(settings: WorkerSettings) -> int:
    if not settings.metrics_port:
        return _fail("--check needs WORKER_METRICS_PORT (it is 0)", 1)
    url = f"http://127.0.0.1:{settings.metrics_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return 0 if r.status == 200 else 1
    except (urllib.error.URLError, OSError) as e:
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1


def run(settings: WorkerSettings) -> int:
    from worker.allocator import keep_freed_memory
    from worker.service import StartupError, Worker

    keep_freed_memory()  # before the first batch allocates anything
    try:
        worker = Worker(settings, freeze_gc=True)
    except ValueError as e:  # e.g. WORKER_DEVICE=cuda on a machine without CUDA
        return _fail(f"invalid setting WORKER_DEVICE={settings.device!r}: {e}")
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    try:
        worker.run()
    except StartupError as e:
        return _fail(str(e), 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "score":
        from worker.offline import main as score_main

        return score_main(argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] not in ("--check",):
        return _fail(f"unknown argument {argv[0]!r}; see python -m worker --help")
    try:
        settings = _load_settings()
    except ValidationError as e:
        return _fail(settings_error_line(e, "WORKER_"))
    if argv == ["--check"]:
        return check(settings)
    configure_logging(settings.log_level)
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
