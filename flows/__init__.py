import os

# Stage modules log through the standard `tasks.*` loggers; show them in Prefect's run logs.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks")
# Prefect's ephemeral server migrates its database on first start: slow on 2 cores.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# Prefect's telemetry heartbeat races the migration of a brand-new server database and prints
# a long "database is locked" traceback in the middle of a successful first run.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import logging  # noqa: E402

logging.getLogger("tasks").setLevel(logging.INFO)
