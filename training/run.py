"""The run folder: config.json, metrics.csv (tidy: stage, epoch, step, name, value),
checkpoints and pictures/."""
import csv
import os
import platform
import subprocess
import tempfile

import torch

from config import save_config
from files import atomic_path
from errors import UserError
from training import distributed as dist


METRICS_COLUMNS = ["stage", "epoch", "step", "name", "value"]


def writable_folder(folder, what="output folder", create=True):
    """Prove a file can be written in `folder` before any long work (makedirs succeeds on an
    existing read-only folder), creating it if needed; or, with create=False, without making it:
    the probe goes into the nearest folder that exists on its path. Returns `folder`."""
    probe_in = folder
    if not create:
        probe_in = os.path.abspath(folder)
        while not os.path.exists(probe_in):
            probe_in = os.path.dirname(probe_in)
    try:
        if create:
            os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test", dir=probe_in)  # unique: runs may share a folder
        os.close(fd)
        os.remove(probe)
    except OSError as e:  # a read-only file system, no permission, a path under a regular file
        raise UserError(f"cannot write to the {what} {folder}: {e.strerror or e}") from None
    return folder


def writable_output(path, flag="--out"):
    """An output file's path, refused before the work that fills it if it is a folder or its
    folder cannot be written (the folder is created). Returns `path`."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder, not a file")
    writable_folder(os.path.dirname(os.path.abspath(path)), f"{flag} folder")
    return path


class Run:
    def __init__(self, folder):
        self.folder = folder  # made by create(), not here: reading a run must not make its folder

    def create(self):
        """Make the folder and prove it writable; training does this only once every check has
        passed, so a refused command leaves no empty folder behind."""
        if dist.is_main():
            writable_folder(self.folder, "results folder")

    def path(self, *names):
        return os.path.join(self.folder, *names)

    def picture(self, name):
        """A path in pictures/, made on first use (a classifier draws none there)."""
        os.makedirs(os.path.join(self.folder, "pictures"), exist_ok=True)
        return os.path.join(self.folder, "pictures", name)

    def save_config(self, cfg, name="config.json"):
        if dist.is_main():
            save_config(cfg, self.path(name))

    def log(self, stage, epoch, step, values):
        if not dist.is_main():
            return
        path = self.path("metrics.csv")
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(METRICS_COLUMNS)
            for name, value in values.items():
                writer.writerow([stage, epoch, step, name, f"{float(value):.6g}"])

    def drop_metrics_after(self, stage, step):
        """Forget the rows `stage` logged after `step`: a run resumed from an earlier checkpoint
        (after a crash, or with --checkpoint_every > 1) logs those steps again."""
        if not dist.is_main():
            return
        rows = self.read_metrics()
        kept = [r for r in rows if r["stage"] != stage or int(r["step"]) <= step]
        if len(kept) == len(rows):
            return
        with atomic_path(self.path("metrics.csv")) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)

    def read_metrics(self):
        """metrics.csv's rows as dicts of strings, each checked to parse (a file cut short by a
        crash or edited by hand gives one error line naming where, not a traceback later)."""
        path = self.path("metrics.csv")
        if not os.path.exists(path):
            return []
        try:
            with open(path, newline="") as f:
                reader = csv.reader(f)
                if next(reader, METRICS_COLUMNS) != METRICS_COLUMNS:
                    raise ValueError(f"its header is not {','.join(METRICS_COLUMNS)}")
                rows = []
                for row in reader:
                    try:
                        if len(row) != len(METRICS_COLUMNS):
                            raise ValueError
                        int(row[1]), int(row[2]), float(row[4])  # noqa: B018 -- parse or fail here
                    except (IndexError, ValueError):
                        raise ValueError(f"line {reader.line_num} is not stage,epoch,step,name,value: "
                                         f"{','.join(row)[:60]!r}") from None
                    rows.append(dict(zip(METRICS_COLUMNS, row)))
                return rows
        except (OSError, csv.Error, ValueError) as e:
            raise UserError(f"{path} is not a readable metrics file ({e}); repair it or move it away") from None


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit():
    """(short commit, whether tracked files differ from it) of this checkout. Outside git (a copy of
    the tree sent to another machine) the commit named by DIFFUSION_SUITE_COMMIT, whose files
    cannot be compared (None), or (None, None)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD") or None
        if commit:
            return commit, bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("DIFFUSION_SUITE_COMMIT") or None, None


def commit_label():
    """The commit figures were measured at, marked when tracked files differed from it."""
    commit, modified = git_commit()
    return f"{commit} (modified)" if commit and modified else commit


def device_name(device):
    """A readable name of the device figures were measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, threads={torch.get_num_threads()}" if device.type == "cpu" else device.type
