"""Run the entry points (main.py, generate.py, visualize.py) as real subprocesses, and snapshot
run folders to prove a command changed nothing. Shared by the CLI-level test files.

Every command runs with cwd = the repository root (found from this file's location), the test
interpreter, a headless matplotlib and one intra-op thread (several commands may run at once on
a small CI machine). Pass an explicit --results_dir to anything that may write: the default
(results/<dataset>_<model>) is inside the repository.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def cli_env(threads: int = 1, **extra) -> dict:
    env = dict(os.environ)
    env.update(MPLBACKEND="Agg", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), SUITE_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONWARNINGS", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def command(script: str, *args) -> list[str]:
    """[python, <repo>/<script>, args...] with every argument as a string."""
    return [PYTHON, str(REPO / script), *map(str, args)]


@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    started: float = 0.0  # wall-clock time.time() at start and end
    ended: float = 0.0

    @property
    def stderr_lines(self) -> list[str]:
        """Non-empty stderr lines; a carriage return (a progress bar redrawn) also ends a line."""
        return [line for line in self.stderr.replace("\r", "\n").splitlines() if line.strip()]

    def describe(self) -> str:
        return (f"$ {' '.join(self.argv[1:])}\nexit status {self.returncode} after {self.seconds:.1f}s\n"
                f"--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}")


def run_cli(script: str, *args, timeout: float = 180, env: dict | None = None) -> Result:
    """Run one entry point to completion; stdin is closed (CI has none)."""
    argv = command(script, *args)
    start, started = time.monotonic(), time.time()
    try:
        proc = subprocess.run(argv, cwd=REPO, env=env or cli_env(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return Result(argv, -9, out, err + f"\n[test harness: timed out after {timeout}s]",
                      time.monotonic() - start, started, time.time())
    return Result(argv, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start, started, time.time())


def run_many(calls: list[tuple], workers: int = 3, timeout: float = 180) -> list[Result]:
    """Run several (script, *args) calls concurrently (each is a separate process); results in order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(run_cli, call[0], *call[1:], timeout=timeout) for call in calls]
        return [f.result() for f in futures]


@dataclass
class Background:
    """A command running in the background with stdout/stderr going to files (no pipe to fill)."""
    argv: list[str]
    log_dir: Path
    proc: subprocess.Popen = field(init=False)
    started: float = field(init=False)

    def __post_init__(self):
        self.log_dir.mkdir(parents=True, exist_ok=True)
        n = len(list(self.log_dir.glob("*.stdout")))
        self.stdout_path = self.log_dir / f"{n:02d}.stdout"
        self.stderr_path = self.log_dir / f"{n:02d}.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, env=cli_env(), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err)
        self.started = time.monotonic()

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for(self, predicate, timeout: float, poll: float = 0.05) -> bool:
        """Wait until predicate(self) is true (True) or the process ended / time ran out (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            if self.proc.poll() is not None:
                return predicate(self)
            time.sleep(poll)
        return False

    def signal(self, signum=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def describe(self) -> str:
        return (f"$ {' '.join(self.argv[1:])}\nexit status {self.proc.poll()}\n--- stdout ---\n"
                f"{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}")


def start_cli(script: str, *args, log_dir: Path) -> Background:
    return Background(command(script, *args), Path(log_dir))


@contextlib.contextmanager
def one_torch_thread():
    """Tiny in-process training on one intra-op thread: on a small, busy CI machine a second
    spinning OpenMP thread makes each step many times slower, not faster."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Snapshots: "no file of an earlier run changed"


def snapshot(folder) -> dict[str, tuple[int, int, str]]:
    """relative path -> (size, mtime_ns, sha256) of every regular file under `folder` (a file
    that vanishes while the folder is walked is left out)."""
    folder = Path(folder)
    result = {}
    for path in sorted(folder.rglob("*")):
        try:
            if path.is_file() and not path.is_symlink():
                st = path.stat()
                result[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns,
                                                         hashlib.sha256(path.read_bytes()).hexdigest())
        except FileNotFoundError:
            pass
    return result


def snapshot_diff(before: dict, after: dict) -> list[str]:
    """Human-readable differences: files added, removed or changed (size, mtime or content)."""
    return [text for text, _ in snapshot_changes(before, after)]


def snapshot_changes(before: dict, after: dict) -> list[tuple[str, float | None]]:
    """(description, new mtime in seconds or None for a removed file) of every difference."""
    changes = [(f"added {p}", after[p][1] / 1e9) for p in sorted(set(after) - set(before))]
    changes += [(f"removed {p}", None) for p in sorted(set(before) - set(after))]
    for p in sorted(set(before) & set(after)):
        if before[p] != after[p]:
            what = [name for name, a, b in zip(("size", "mtime", "content"), before[p], after[p]) if a != b]
            changes.append((f"changed {p} ({', '.join(what)})", after[p][1] / 1e9))
    return changes


def assert_one_line_error(result: Result, status: int = 2, contains: str | None = None):
    """The bad-input contract: exit `status`, exactly one non-empty stderr line, which says
    "error: ...", and no traceback anywhere."""
    where = result.describe()
    assert "Traceback" not in result.stderr + result.stdout, where
    assert result.returncode == status, where
    lines = result.stderr_lines
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}\n{where}"
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: ") + 5, where
    if contains is not None:
        assert contains.lower() in lines[0].lower(), f"expected {contains!r} in the message\n{where}"
    return lines[0]
