"""Doing something inside a network namespace (``ip netns``) from this process."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000
T = TypeVar("T")
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """``fn()`` called in network namespace ``netns`` (None: this one), from a thread of
    its own (``setns`` moves only the calling thread, which then ends): what it opens
    (a TAP, a socket) belongs to that namespace."""
    if netns is None:
        return fn()
    result: list[T] = []
    failure: list[BaseException] = []

    def enter() -> None:
        try:
            ns_fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(ns_fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(ns_fd)
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=enter, name="novasandbox-netns")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]
