"""Housekeeping of an MLflow experiment: runs of processes that died are marked KILLED."""

from __future__ import annotations

import os
import socket
from typing import Any


def process_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) is no probe on Windows: never call a run dead there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by someone else
        return True
    return True


def owner_tags() -> dict[str, str]:
    """The tags that say which process logs to a run (what mark_dead_runs_killed judges)."""
    return {"pipeline.host": socket.gethostname(), "pipeline.pid": str(os.getpid())}


def mark_dead_runs_killed(client: Any, experiment_id: str) -> None:
    """A SIGKILLed stage leaves its run RUNNING forever: mark runs of dead processes on this host KILLED.

    Runs carry the host and pid of the process that logs to them (`pipeline.host`, `pipeline.pid`);
    only runs of this host are judged, and a pid that exists again is taken as alive.
    """
    host = socket.gethostname().replace("'", "")
    running = client.search_runs(
        [experiment_id],
        f"attributes.status = 'RUNNING' and tags.`pipeline.host` = '{host}'",
        max_results=1000,
    )
    for run in running:
        pid = run.data.tags.get("pipeline.pid", "")
        if pid.isdigit() and not process_alive(int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")
