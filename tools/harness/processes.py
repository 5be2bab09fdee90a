"""Child processes for the tools and the tests: free ports, bounded waits, and the one gunicorn runner.

`Process` runs a command in its own session with its output in a log file, and stops its whole process group
(SIGTERM, then SIGKILL). `GunicornBackend` is this repository's server as `make run` starts it
(`gunicorn -c gunicorn.conf.py --bind 127.0.0.1:<free port> _wsgi:app`), waits until /health answers, and
reads its worker's pid, memory and CPU time from /proc. Nothing here talks to anything but 127.0.0.1.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import requests

REPO = Path(__file__).resolve().parents[2]
GUNICORN_CONF = REPO / "gunicorn.conf.py"


class HarnessError(RuntimeError):
    """Something in the harness went wrong; the message carries the log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def tail(path: Path | None, chars: int = 6000) -> str:
    if path is None or not Path(path).is_file():
        return "(no log)"
    text = Path(path).read_text(errors="replace")
    return text[-chars:]


def wait_for(check: Callable[[], Any], timeout: float, interval: float = 0.5, what: str = "condition",
             alive: Callable[[], bool] | None = None, log: Path | None = None) -> Any:
    """Call `check` until it returns something truthy; raise after `timeout` s or when `alive()` turns false."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise HarnessError(f"process died while waiting for {what}; log tail:\n{tail(log)}")
        try:
            value = check()
            if value:
                return value
        except (requests.RequestException, ValueError, KeyError) as error:
            last_error = error
        time.sleep(interval)
    raise HarnessError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error!r}); "
                       f"log tail:\n{tail(log)}")


def environment(extra: Mapping[str, str] | None = None, drop: Iterable[str] = ("GUNICORN_CMD_ARGS",)) -> dict[str, str]:
    """This process's environment without the variables named in `drop`, plus `extra`: a child's environment.

    GUNICORN_CMD_ARGS is dropped by default: nothing from the caller's shell may override a runner's command line.
    """
    dropped = set(drop)
    env = {key: value for key, value in os.environ.items() if key not in dropped}
    env.update(extra or {})
    return env


# ---- /proc ---------------------------------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    """Child process ids of `pid` (from /proc/<pid>/task/*/children, else by scanning /proc/*/stat)."""
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(p) for p in (task / "children").read_text().split()]
    except OSError:
        pass
    if found:
        return sorted(set(found))
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of `pid` in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = round(int(rest.split()[0]) / 1024, 1)
    return values


def rss_kib(pid: int) -> int | None:
    """VmRSS of `pid` in KiB; None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


# ---- processes -----------------------------------------------------------------------------------------------
class Process:
    """A child process in its own process group, with its output in a log file.

    stdout and stderr go to `log_path` together, or stderr to `err_path` when one is given. With `append` a
    restart adds to the log under a header line; without, each start begins a new log.
    """

    #: seconds `stop` waits after SIGTERM before it sends SIGKILL
    stop_timeout: float = 20

    def __init__(self, log_path: Path, err_path: Path | None = None, append: bool = True) -> None:
        self.log_path = Path(log_path)
        self.err_path = Path(err_path) if err_path else None
        self.append = append
        self.process: subprocess.Popen | None = None
        self._logs: list = []
        self._at_exit = False

    @property
    def error_log(self) -> Path:
        """The file holding the process's errors (its stderr)."""
        return self.err_path or self.log_path

    def spawn(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        if self.alive():
            raise HarnessError(f"already running (pid {self.process.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        mode = "ab" if self.append else "wb"
        out = open(self.log_path, mode)
        err = open(self.err_path, mode) if self.err_path else None
        self._logs = [out] + ([err] if err else [])
        if self.append:
            out.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(args)}\n".encode())
            out.flush()
        self.process = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=err or subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        # Its own session keeps a Ctrl-C meant for pytest away from it; this stops it when the caller exits anyway.
        if not self._at_exit:
            atexit.register(self.stop)
            self._at_exit = True

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self, timeout: float) -> int | None:
        """The exit status once the process ends, or None if it still runs after `timeout` s."""
        if self.process is None:
            raise HarnessError("not started")
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM the process group, then SIGKILL it if it does not exit in `timeout` s."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            for sig, wait in ((signal.SIGTERM, self.stop_timeout if timeout is None else timeout),
                              (signal.SIGKILL, 10)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for log in self._logs:
            log.close()
        self._logs = []

    def log_tail(self, chars: int = 6000) -> str:
        return tail(self.error_log, chars)


class GunicornBackend(Process):
    """This repository's backend (or another WSGI `app`) under gunicorn with gunicorn.conf.py, as deployed.

    `start` binds 127.0.0.1:`port` (a free port unless given) and waits until `ready` (by default: /health
    answers 200). `worker` is the pid of its one worker when it has exactly one.
    """

    stop_timeout = 30  # gunicorn's own graceful timeout

    def __init__(self, log_path: Path, app: str = "_wsgi:app", *, cwd: Path = REPO, port: int | None = None,
                 err_path: Path | None = None, append: bool = True) -> None:
        super().__init__(log_path, err_path, append)
        self.app = app
        self.cwd = Path(cwd)
        self.port = port or free_port()
        self.worker: int | None = None
        self.startup_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def executable() -> str:
        """gunicorn next to this interpreter (in its virtualenv), else the one on PATH."""
        gunicorn = Path(sys.executable).with_name("gunicorn")
        return str(gunicorn) if gunicorn.exists() else "gunicorn"

    def command(self, options: Iterable[str] = (), bind: bool = True) -> list[str]:
        bound = ["--bind", f"127.0.0.1:{self.port}"] if bind else []
        return [self.executable(), "-c", str(GUNICORN_CONF), *bound, *options, self.app]

    def launch(self, env: dict[str, str], options: Iterable[str] = (), bind: bool = True) -> None:
        """Start gunicorn with this complete environment (see `environment`) and return at once.

        Without `bind` gunicorn.conf.py binds 0.0.0.0:$PORT, as in the container.
        """
        self.worker = None
        self.spawn(self.command(options, bind), env, cwd=self.cwd)

    def start(self, env: dict[str, str], options: Iterable[str] = (), *, bind: bool = True, timeout: float = 300,
              interval: float = 0.5, ready: Callable[[], bool] | None = None,
              single_worker: bool = False) -> "GunicornBackend":
        """`launch`, then wait until `ready()`; with `single_worker`, insist on exactly one worker."""
        started = time.monotonic()
        self.launch(env, options, bind)
        try:
            wait_for(ready or self.healthy, timeout, interval=interval, what=f"{self.app} on port {self.port}",
                     alive=self.alive, log=self.error_log)
            self.startup_s = time.monotonic() - started
            workers = children(self.process.pid)
            if len(workers) == 1:
                self.worker = workers[0]
            elif single_worker:
                raise HarnessError(f"expected one gunicorn worker under {self.process.pid}, found {workers} "
                                   f"(WORKERS must be 1)")
        except BaseException:
            self.stop()
            raise
        return self

    def healthy(self) -> bool:
        return requests.get(self.url + "/health", timeout=3).status_code == 200

    def metrics(self) -> dict:
        return requests.get(self.url + "/metrics", timeout=10).json()

    def memory(self) -> dict[str, float]:
        """VmRSS and VmHWM of the worker in MiB."""
        assert self.worker is not None
        return memory_mb(self.worker)

    def cpu(self) -> float:
        """CPU seconds the worker has used so far."""
        assert self.worker is not None
        return cpu_seconds(self.worker)


def dump_logs(*processes: Process | None, chars: int = 8000, stream=sys.stderr) -> None:
    """Print the tail of each process's log (for failing tests)."""
    for process in processes:
        if process is None:
            continue
        print(f"\n===== {type(process).__name__} log {process.log_path} (tail) =====", file=stream)
        print(process.log_tail(chars), file=stream)


__all__ = ["GunicornBackend", "HarnessError", "Process", "children", "cpu_seconds", "dump_logs", "environment",
           "free_port", "memory_mb", "rss_kib", "tail", "wait_for"]
