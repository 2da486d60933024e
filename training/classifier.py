"""The real-data classifier stage (`main.py --train_classifier`): a small ResNet trained on the
real training split; its accuracy on real held-out images is the reference for the offline sample
metrics."""
import os

import torch
import torch.nn.functional as F

from config import write_json
from data import split_digest, to_float
from data.batcher import DeviceBatcher
from errors import UserError
from evaluation.metrics import per_class_accuracy
from models.classifier import ImageClassifier
from training import distributed as dist
from training.optim import autocast, grads_finite_step, load_optimizer_state, make_optimizer, make_scaler

CLASSIFIER_FILE = "classifier_best.pt"


def default_classifier_dir(cfg):
    return os.path.join("results", f"{cfg.dataset}_classifier")


def random_translate(x, max_shift=4):
    """Per-sample random shifts of up to max_shift pixels with reflected borders (the usual
    pad-and-crop augmentation, done on the device)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="reflect")
    dx, dy = (torch.randint(0, 2 * max_shift + 1, (b,), device=x.device) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None].expand(b, h, w)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :].expand(b, h, w)
    flat = rows * padded.shape[-1] + cols
    return padded.flatten(2).gather(2, flat.flatten(1)[:, None].expand(-1, x.shape[1], -1)).view_as(x)


def build_classifier(cfg, num_classes):
    return ImageClassifier(num_classes, cfg.image_size, cfg.classifier_width)


class ClassifierStage:
    kind = "classifier"
    # its own options file: it may share a run's folder, whose config.json describes that run
    config_name = "classifier_config.json"
    last_name, best_name = "classifier_last.pt", CLASSIFIER_FILE
    saved_names = (best_name,)
    best_metric = ("val_accuracy", "max")

    def __init__(self, cfg, class_names, device, val_set, steps_total, run):
        self.cfg, self.device, self.run, self.class_names = cfg, device, run, list(class_names)
        self.model = build_classifier(cfg, len(class_names)).to(device)
        if dist.enabled() and device.type == "cuda":  # batch statistics over every GPU's share, and
            # the same running statistics on every rank (SyncBatchNorm runs on GPUs only: under gloo
            # on CPUs each process normalizes its own share)
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.train_model = dist.wrap(self.model, device)
        self.opt = make_optimizer(self.model.parameters(), cfg.classifier_lr, weight_decay=5e-4, device=device)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, cfg.classifier_lr, total_steps=max(steps_total, 1))
        self.scaler = make_scaler(device, cfg.amp)
        self.val_images, self.val_labels = val_set.images, val_set.labels
        self.heldout_digest = split_digest(val_set.images, val_set.labels)

    def train_step(self, x, y, epoch):
        with autocast(self.device, self.cfg.amp):
            loss = F.cross_entropy(self.train_model(random_translate(x)).float(), y, label_smoothing=0.1)
        if not grads_finite_step(loss, list(self.model.parameters()), self.opt, self.cfg.grad_clip, self.scaler):
            return None
        if self.sched.last_epoch + 1 < self.sched.total_steps:
            self.sched.step()
        return {"loss": loss.detach()}

    def validate(self, epoch):
        report = evaluate_classifier(self.model, self.val_images, self.val_labels, len(self.class_names), self.device)
        row = {"val_accuracy": report["accuracy"]}
        if len(self.class_names) <= 10:
            row.update({f"val_accuracy_{c}": a for c, a in zip(self.class_names, report["per_class"])})
        return row

    def pictures(self, epoch):
        from viz.figures import plot_losses
        plot_losses(self.run, self.kind, self.run.path("classifier_losses.png"))

    def state_dict(self):
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                 "class_names": self.class_names, "width": self.cfg.classifier_width,
                 "heldout_digest": self.heldout_digest}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state):
        planned = state["sched"].get("total_steps")
        if planned is not None and planned != self.sched.total_steps:  # OneCycleLR would keep the old plan
            raise UserError(f"the classifier's one-cycle learning rate is planned over {planned} steps, and this "
                            f"resume would take {self.sched.total_steps} (another --subset or number of processes): "
                            f"resume it with the settings it started with")
        self.model.load_state_dict(state["model"])
        load_optimizer_state(self.opt, state["opt"], self.device)
        self.sched.load_state_dict(state["sched"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


@torch.no_grad()
def classifier_logits(model, images_uint8, device, batch_size=500):
    model.eval()
    return torch.cat([model(to_float(images_uint8[i:i + batch_size].to(device))).float().cpu()
                      for i in range(0, len(images_uint8), batch_size)])


def evaluate_classifier(model, images_uint8, labels, num_classes, device):
    was_training = model.training
    report = per_class_accuracy(classifier_logits(model, images_uint8, device), labels, num_classes)
    model.train(was_training)
    return report


def train_classifier(cfg, resume=False):
    from training.loop import fit
    from training.runner import _start, load_split, load_splits, resume_state_for
    device, run = _start(cfg)
    state = resume_state_for(cfg, ClassifierStage, resume)
    train, val = load_splits(cfg)
    test = load_split(cfg, "test")  # read now: a bad test file is refused before training, not after
    batcher = DeviceBatcher(train.images, train.labels, dist.per_rank_batch_size(cfg.classifier_batch_size), device,
                            flip=cfg.hflip, seed=cfg.seed, rank=dist.rank(), world_size=dist.world_size())
    stage = ClassifierStage(cfg, train.class_names, device, val, len(batcher) * cfg.classifier_epochs, run)
    fit(stage, batcher, cfg, run, cfg.classifier_epochs, state)
    if dist.is_main():
        write_report(stage, run, train.class_names, val, test, device)
    return run


def write_report(stage, run, class_names, val, test, device):
    """classifier_report.json from the best checkpoint: accuracy per class on the validation images
    that chose that checkpoint, and on the test images, which nothing chose, when the dataset has
    its own (the unbiased figure; without one, test is the validation split itself)."""
    from training.checkpoint import load_checkpoint
    stage.model.load_state_dict(load_checkpoint(run.path(CLASSIFIER_FILE))["stage"]["model"])
    report = evaluate_classifier(stage.model, val.images, val.labels, len(class_names), device)
    report.update(class_names=list(class_names), heldout_images=len(val.images))
    rows = [("validation", report, len(val.images))]
    if split_digest(test.images, test.labels) != split_digest(val.images, val.labels):
        test_report = evaluate_classifier(stage.model, test.images, test.labels, len(class_names), device)
        report.update(test_accuracy=test_report["accuracy"], test_per_class=test_report["per_class"],
                      test_class_counts=test_report["class_counts"], test_images=len(test.images))
        rows.append(("test", test_report, len(test.images)))
    write_json(report, run.path("classifier_report.json"))
    print(run.path("classifier_report.json"))
    for split, r, count in rows:
        print(f"{split} accuracy {r['accuracy']:.4f} on {count} images")
        for name, acc in zip(class_names, r["per_class"]):
            print(f"  {name:>24s}: {acc:.4f}")
