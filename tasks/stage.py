"""How a stage function becomes a Prefect task.

Every stage module ends with one line, `<name>_task = stage("<name>", <function>)`, so the
plain function stays the library API (tests and benchmarks call it directly) and the flow
calls the task. Each stage is then a task run in the Prefect UI that logs its start and how
it ended, "done" or "reused" (an earlier run's output, same input, config and code), and
its record carries the seconds it took.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TypeVar

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from schemas.tables import StageRecord

Record = TypeVar("Record", bound=StageRecord)


def stage(name: str, function: Callable[..., Record], **options) -> Task:
    """The Prefect task `name` running `function`, a stage that returns a StageRecord.

    `options` are Prefect task options (retries, task_run_name, ...). Prefect's own result
    cache stays off: stages cache their outputs by content (tasks/workspace.py).
    """

    @functools.wraps(function)
    def timed(*args, **kwargs) -> Record:
        logger = get_run_logger()
        started = time.perf_counter()
        logger.info("stage %s: started", name)
        record = function(*args, **kwargs)
        seconds = round(time.perf_counter() - started, 2)
        logger.info("stage %s: %s in %.1f s", name, "reused" if record.reused else "done", seconds)
        return record.model_copy(update={"seconds": seconds})

    return task(timed, name=name, cache_policy=NO_CACHE, **options)
