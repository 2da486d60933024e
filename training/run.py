"""The run folder: config.json, metrics.csv (tidy: stage, epoch, step, name, value),
checkpoints and pictures/."""
import csv
import os

from config import save_config
from errors import UserError
from training import distributed as dist


class Run:
    def __init__(self, folder, create=True):
        self.folder = folder
        if create and dist.is_main():
            try:
                os.makedirs(os.path.join(folder, "pictures"), exist_ok=True)
                probe = os.path.join(folder, ".write_test")
                with open(probe, "w"):
                    pass
                os.remove(probe)
            except OSError as e:
                raise UserError(f"cannot write to the results folder {folder}: {e.strerror}") from None

    def path(self, *names):
        return os.path.join(self.folder, *names)

    def picture(self, name):
        return os.path.join(self.folder, "pictures", name)

    def save_config(self, cfg):
        if dist.is_main():
            save_config(cfg, self.path("config.json"))

    def log(self, stage, epoch, step, values):
        if not dist.is_main():
            return
        path = self.path("metrics.csv")
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["stage", "epoch", "step", "name", "value"])
            for name, value in values.items():
                writer.writerow([stage, epoch, step, name, f"{float(value):.6g}"])

    def read_metrics(self):
        path = self.path("metrics.csv")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return list(csv.DictReader(f))
