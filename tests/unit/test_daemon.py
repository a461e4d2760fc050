"""Stopping a detached process waits until all of it is gone, not just its main thread."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

from dicomgrid.core.daemon import Daemon

# Like a JVM's launcher: the main thread exits first, and another thread holds the port a while longer
# (a JVM's shutdown hooks); SIGTERM is left to that thread, so the process does not die of it at once.
_SLOW_TO_STOP = """
import ctypes, signal, socket, sys, threading, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0))
listener.listen()
open(sys.argv[1], "w").write(str(listener.getsockname()[1]))
def shutdown_hooks():
    time.sleep(1.5)
    listener.close()
threading.Thread(target=shutdown_hooks).start()
ctypes.CDLL(None).pthread_exit(None)
"""


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_a_process_whose_main_thread_exited_first_is_stopped_only_once_its_port_is_released(tmp_path: Path):
    daemon = Daemon("slow", tmp_path / "slow.pid", tmp_path / "slow.log", tmp_path / "slow.out")
    port_file = tmp_path / "port"
    daemon.start([sys.executable, "-c", _SLOW_TO_STOP, str(port_file)], tmp_path)
    deadline = time.monotonic() + 10
    while not (port_file.exists() and port_file.read_text()):
        assert time.monotonic() < deadline, daemon.excerpt()
        time.sleep(0.05)
    port = int(port_file.read_text())
    time.sleep(0.3)  # the main thread is gone by now: the kernel shows the process as a zombie
    assert _listening(port)
    daemon.stop(grace=10)
    assert not _listening(port)
