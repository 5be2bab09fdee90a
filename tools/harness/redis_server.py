"""A real redis-server on a loopback port, for the tests and the bench (scripts/install_redis.sh installs it).

`RedisServer(folder).start()` runs `redis-server` with no persistence, bound to 127.0.0.1 on a free port (or
`port`, to restart on the same one), `maxmemory` with `allkeys-lru` as the deployment runs it; `stop()` ends it.
"""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from tools.harness.processes import REPO, HarnessError, Process, free_port, wait_for

#: where scripts/install_redis.sh unpacks Debian's package when it cannot install it system-wide
LOCAL_INSTALL = REPO / ".redis" / "usr" / "bin" / "redis-server"


def executable() -> str | None:
    """$REDIS_SERVER, else redis-server on PATH or /usr/bin, else the one install_redis.sh unpacked."""
    for candidate in (os.environ.get("REDIS_SERVER"), shutil.which("redis-server"), "/usr/bin/redis-server",
                      str(LOCAL_INSTALL)):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


class RedisServer(Process):
    def __init__(self, folder: Path, port: int | None = None, maxmemory: str = "512mb") -> None:
        super().__init__(Path(folder) / "redis.log")
        self.folder = Path(folder)
        self.port = port or free_port()
        self.maxmemory = maxmemory

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30) -> RedisServer:
        binary = executable()
        if binary is None:
            raise HarnessError("no redis-server: run scripts/install_redis.sh (make test does)")
        self.spawn([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru", "--dir", str(self.folder)],
                   env=self._environment(binary), cwd=self.folder)
        wait_for(self.ping, timeout, interval=0.1, what=f"redis-server on port {self.port}", alive=self.alive,
                 log=self.log_path)
        return self

    @staticmethod
    def _environment(binary: str) -> dict[str, str]:
        env = dict(os.environ)
        if Path(binary) == LOCAL_INSTALL:  # the unpacked package's libraries (liblzf, jemalloc) sit beside it
            libs = str(REPO / ".redis" / "usr" / "lib" / "x86_64-linux-gnu")
            env["LD_LIBRARY_PATH"] = ":".join(filter(None, [libs, env.get("LD_LIBRARY_PATH")]))
        return env

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


__all__ = ["LOCAL_INSTALL", "RedisServer", "executable"]
