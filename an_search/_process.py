"""This process's place among others: is a process id alive, and which PID namespace ids are in.

Both the temporary files of atomic writes and the workers' trials record a process id, to be
cleaned up when that process is gone; ids compare only within one host and PID namespace.
"""

from __future__ import annotations

import os

__all__ = ["PID_NAMESPACE", "alive"]


def _pid_namespace() -> int | None:
    """This process's PID namespace (containers that share a hostname have their own)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


#: This process's PID namespace (the inode of ``/proc/self/ns/pid``); None off Linux.
PID_NAMESPACE = _pid_namespace()


def alive(pid: int) -> bool:
    """Whether a process with this id exists here (one that cannot be asked counts as alive:
    another user's, or an id out of range)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True
    return True
