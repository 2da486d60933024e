"""Evaluation of a trained run: offline metrics from the real-data classifier (per-class sample
accuracy, Frechet distance and KID in its features, memorization), the standard Inception
FID/KID when its weights are available, and the diffusion classifier."""
import functools
import os
import sys
import time

import torch

from data import load_dataset, split_digest, to_uint8
from config import write_json
from errors import UserError
from evaluation.metrics import extract_features, frechet_distance, kernel_inception_distance, per_class_accuracy
from training.checkpoint import check_compatible, load_checkpoint
from training.run import commit_label, device_name


def _load(cfg, split, subset=None):
    """One split of the run's data (train: `subset` of it, as --subset takes it). A held-out split
    is read once per process: the check of its classes, the classifier's check and the metrics
    each need it."""
    read = _read_split if split == "train" else _read_heldout_split
    return read(cfg.dataset, cfg.data_root, split, cfg.image_size, cfg.val_fraction, cfg.attribute,
                cfg.flowers_splits, subset)


def _read_split(dataset, data_root, split, image_size, val_fraction, attribute, flowers_splits, subset):
    return load_dataset(dataset, data_root, split, image_size, val_fraction=val_fraction, attribute=attribute,
                        flowers_splits=flowers_splits, subset=subset)


_read_heldout_split = functools.lru_cache(maxsize=2)(_read_split)  # callers copy what they take (real_split)


def fixed_subset(n, limit):
    """Indices of a fixed, class-mixed subset of at most `limit` of n items (held-out splits
    may be sorted by class)."""
    if limit is None or n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit]


def real_split(cfg, split, limit=None, subset=None):
    data = _load(cfg, split, subset)
    keep = fixed_subset(len(data.images), limit)
    return data.images[keep], data.labels[keep]


def check_heldout_classes(cfg, class_names, heldout_digest=None):
    """Scores against held-out images of other classes would compare label i of the run with
    label i of unrelated data, and against other held-out images than the run's (the data changed
    since) might count images it trained on: refuse them. heldout_digest: the run's fingerprint of
    its held-out split (None for runs from before 2026-11-25)."""
    heldout = _load(cfg, "val")
    where = cfg.data_root or cfg.dataset
    if list(heldout.class_names) != list(class_names):
        raise UserError(f"the data in {where} has the classes {', '.join(heldout.class_names)}, not the "
                        f"run's {', '.join(class_names)}: give the data the run was trained on")
    if heldout_digest is not None and heldout_digest != split_digest(heldout.images, heldout.labels):
        raise UserError(f"the data in {where} holds out other images than the run did (files added or removed "
                        f"since, or another --val_fraction or --flowers_splits): its held-out scores could count "
                        f"images the run trained on; give the data the run was trained on")


def check_classifier_data(state, cfg, path):
    """The real-data classifier must know this run's classes and hold out exactly its held-out
    images: one trained on another folder, or with another --val_fraction or --flowers_splits,
    would score garbage or have trained on the images it is scored on."""
    val = _load(cfg, "val")
    fix = (f"train one for this data (`python main.py --train_classifier --dataset {cfg.dataset} ... "
           f"--results_dir DIR`) and pass --classifier_path DIR/{os.path.basename(path)}")
    if list(state["stage"]["class_names"]) != list(val.class_names):
        raise UserError(f"the real-data classifier {path} knows the classes {', '.join(state['stage']['class_names'])}, "
                        f"not this run's {', '.join(val.class_names)}: {fix}")
    saved = state["stage"].get("heldout_digest")  # older classifiers have none
    if saved is not None and saved != split_digest(val.images, val.labels):
        raise UserError(f"the real-data classifier {path} held out other images than this run does (another data "
                        f"folder, --val_fraction or --flowers_splits, or a classifier from before 2026-11-24, whose "
                        f"fingerprint of them differs): {fix}")


def load_real_classifier(cfg, device, path=None):
    """The classifier trained on the real data of the run's dataset (main.py --train_classifier)."""
    from training.classifier import CLASSIFIER_FILE, build_classifier, default_classifier_dir
    candidates = [path] if path else [os.path.join(cfg.results_dir or "", CLASSIFIER_FILE),
                                      os.path.join(default_classifier_dir(cfg), CLASSIFIER_FILE)]
    found = next((p for p in candidates if p and os.path.isfile(p)), None)
    if found is None:
        raise UserError(f"no real-data classifier for {cfg.dataset} (looked for {', '.join(candidates)}); "
                        f"train one with `python main.py --train_classifier --dataset {cfg.dataset}"
                        f"{' --data_root ' + cfg.data_root if cfg.data_root else ''}` or pass --classifier_path")
    from config import Config
    from pipeline import load_weights, require_parts
    state = load_checkpoint(found, "classifier checkpoint")
    check_compatible(state, cfg, "classifier", found)
    require_parts(state.get("stage"), ("class_names", "model"), found, "classifier")
    check_classifier_data(state, cfg, found)
    saved = Config.from_dict(state["config"])
    model = build_classifier(saved, len(state["stage"]["class_names"]))
    load_weights(model, state["stage"]["model"], found, "classifier")
    model.to(device).eval()
    model.checkpoint_path, model.heldout_digest = found, state["stage"].get("heldout_digest")
    return model


class OfflineMetrics:
    """Classifier-feature metrics against fixed real features (computed once)."""

    def __init__(self, classifier, cfg, device, num_classes):
        self.classifier, self.device, self.num_classes = classifier, device, num_classes
        self.mirrors = cfg.hflip  # a model trained on mirror images may copy them mirrored
        # FD and KID compare with a fixed subset of 10,000 training images, as they did when FD/KID
        # figures were first recorded (of the whole split, also after --subset: its distribution);
        # near copies are looked for among all the images the run trained on (computed on first
        # use: the sampling sweep never asks).
        self.train_images, _ = real_split(cfg, "train")
        self.train_subset = fixed_subset(len(self.train_images), 10000)
        self.train_feats = self.features(self.train_images[self.train_subset])
        self.trained_images = real_split(cfg, "train", subset=cfg.subset)[0] if cfg.subset else self.train_images
        self._all_train_feats = None
        self.val_images, self.val_labels = real_split(cfg, "val", limit=10000)
        self.val_feats = self.features(self.val_images)
        # The reference accuracy comes from the test images when the dataset has its own: the
        # classifier's best checkpoint was chosen on the validation images, which flatters it there.
        test_images, test_labels = real_split(cfg, "test", limit=10000)
        own_test = split_digest(test_images, test_labels) != split_digest(self.val_images, self.val_labels)
        self.real_split = "test" if own_test else "val"
        self.real_accuracy = self.accuracy(*((test_images, test_labels) if own_test else
                                             (self.val_images, self.val_labels)))

    @property
    def all_train_feats(self):
        """Features of every image the run trained on, then of their mirror images when it flipped them."""
        if self._all_train_feats is None:
            # the FD subset is then all of them, in order
            whole = self.trained_images is self.train_images and len(self.train_subset) == len(self.train_images)
            feats = [self.train_feats if whole else self.features(self.trained_images)]
            if self.mirrors:
                feats.append(self.features(self.trained_images, mirrored=True))
            self._all_train_feats = torch.cat(feats)
        return self._all_train_feats

    def train_image(self, index):
        """The training image of all_train_feats' row `index` (mirrored past the originals)."""
        image = self.trained_images[index % len(self.trained_images)]
        return image.flip(-1) if index >= len(self.trained_images) else image

    def features(self, images_uint8, mirrored=False):
        return extract_features(self.classifier.features, images_uint8, device=self.device, mirrored=mirrored)

    def accuracy(self, images_uint8, labels):
        from training.classifier import classifier_logits
        return per_class_accuracy(classifier_logits(self.classifier, images_uint8, self.device), labels,
                                  self.num_classes)

    def __call__(self, images_uint8, labels, memorization=True):
        feats = self.features(images_uint8)
        acc = self.accuracy(images_uint8, labels)
        kid_mean, kid_std = kernel_inception_distance(self.train_feats, feats, num_subsets=50)
        # FD is biased upwards the more, the fewer the images: the floor is measured with as many
        # held-out images as there are samples (all of them when there are fewer).
        floor_feats = self.val_feats[fixed_subset(len(self.val_feats), len(feats))]
        # The ratio compares mean per-class accuracies: the held-out split's class frequencies need
        # not be the samples' (balanced) ones.
        out = {"sample_accuracy": acc["accuracy"], "sample_accuracy_per_class": acc["per_class"],
               "sample_balanced_accuracy": acc["balanced_accuracy"],
               "real_heldout_accuracy": self.real_accuracy["accuracy"],
               "real_heldout_balanced_accuracy": self.real_accuracy["balanced_accuracy"],
               "real_heldout_accuracy_per_class": self.real_accuracy["per_class"],
               "real_heldout_split": self.real_split,
               "accuracy_ratio": acc["balanced_accuracy"] / max(self.real_accuracy["balanced_accuracy"], 1e-12),
               "classifier_fd": frechet_distance(self.train_feats, feats),
               "classifier_fd_heldout": frechet_distance(self.val_feats, feats),
               "classifier_fd_real_floor": frechet_distance(self.train_feats, floor_feats),
               "classifier_fd_real_floor_images": len(floor_feats),
               "classifier_kid": kid_mean, "classifier_kid_std": kid_std}
        if memorization:
            from evaluation.memorization import memorization_report
            out["memorization"] = memorization_report(feats, self.val_feats, self.all_train_feats)
            out["memorization"]["mirror_images_searched"] = self.mirrors
        return out


def balanced_labels(num_samples, num_classes):
    return torch.arange(num_samples) % num_classes


def check_sample_count(num_samples, num_classes, what, flag="--num_samples"):
    """A class with no samples would go unscored yet count in FD's reference; KID compares pairs."""
    if num_samples < max(2, num_classes):
        raise UserError(f"{what} needs at least {max(2, num_classes)} samples (one per class of the {num_classes}, "
                        f"and KID compares pairs), got {flag} {num_samples}")


def inception_metrics(cfg, images_uint8, inception, device, cache_dir):
    """Standard FID/KID (with the FID Inception network `inception`) against cached statistics of
    the real training images."""
    from evaluation.inception import fid_kid, reference_stats
    features = lambda imgs: extract_features(inception, imgs, batch_size=100, device=device)  # noqa: E731
    # Keyed by the training images themselves (not their path or split options), so data that
    # changed in place, or another split of it, never reuses stale statistics.
    train_images, train_labels = real_split(cfg, "train")
    key = (f"{cfg.dataset}-{cfg.image_size}-train{split_digest(train_images, train_labels)}-"
           f"inception2048-{inception.weights_digest}")
    mu, sigma, real_feats = reference_stats(key, cache_dir, lambda: features(train_images))
    out = fid_kid(real_feats, features(images_uint8), real_stats=(mu, sigma))
    # Published FIDs use 50,000 samples against a dataset's whole training set: say what this one is.
    out["fid_reference"] = f"{len(train_images)} images of the run's training split"
    if len(images_uint8) < 2048:
        out["fid_caveat"] = (f"{len(images_uint8)} samples, fewer than the 2048 features: the sample covariance is "
                             f"singular and FID biased high; compare only at equal sample counts")
    return out


def evaluate_run(pipe, run_dir, args, seed, out_dir=None):
    """generate.py --evaluate: sample N images (balanced over classes), compute every metric,
    write eval.json (into out_dir, default the run's folder) and print a table."""
    out_dir = out_dir or run_dir
    cfg, device = pipe.cfg, pipe.device
    n = args.num_samples or 2000
    check_sample_count(n, pipe.num_classes, "--evaluate")
    start = time.time()
    check_heldout_classes(cfg, pipe.class_names, pipe.heldout_digest)
    inception, fid_note = None, "skipped (--no_fid)"
    if not args.no_fid:  # before the sampling: a weights file named on the command line must work
        from evaluation.inception import load_fid_inception
        try:
            inception = load_fid_inception(args.inception_weights, device)
        except UserError as e:
            if args.inception_weights:
                raise
            print(f"note: FID/KID skipped: {e}", file=sys.stderr)  # the offline metrics stand on their own
            fid_note = str(e)
    classifier = load_real_classifier(cfg, device, getattr(args, "classifier_path", None))
    offline = OfflineMetrics(classifier, cfg, device, pipe.num_classes)
    labels = balanced_labels(n, pipe.num_classes)
    t0 = time.time()
    images = to_uint8(pipe.sample_batched(labels, batch_size=args.batch_size or 250, seed=seed))
    sampling_seconds = time.time() - t0
    result = {"num_samples": n, "seed": seed, "sampler": cfg.sampler, "steps": cfg.steps,
              "guidance_scale": cfg.guidance_scale, "guidance_schedule": cfg.guidance_schedule,
              "guidance_interval": cfg.guidance_interval, "checkpoint": pipe.checkpoint_path,
              "classifier": classifier.checkpoint_path,
              "dataset": cfg.dataset, "device": device_name(device), "commit": commit_label(),
              "sampling_seconds": sampling_seconds, "class_names": pipe.class_names}
    result.update(offline(images, labels))
    from evaluation.memorization import save_closest_pairs
    pairs = os.path.join(out_dir, "memorization_closest_pairs.png")
    save_closest_pairs(pairs, images, offline.train_image, result["memorization"])
    if inception is None:
        result["fid_note"] = fid_note
    else:
        cache = os.path.join(os.path.dirname(os.path.abspath(run_dir)), ".fid_cache")
        result.update(inception_metrics(cfg, images, inception, device, cache))
    if getattr(args, "classify_images", 0):
        result["diffusion_classifier"] = diffusion_classifier_accuracy(pipe, offline.val_images,
                                                                       offline.val_labels, args.classify_images, seed)
    result["total_seconds"] = time.time() - start
    path = os.path.join(out_dir, "eval.json")
    write_json(result, path)
    print_table(result, pipe.sampling_settings())
    print(f"{path}\n{pairs}")
    return result


def diffusion_classifier_accuracy(pipe, images, labels, limit, seed):
    from evaluation.diffusion_classifier import diffusion_classify
    keep = fixed_subset(len(images), limit)  # not the first `limit`: a held-out split may be sorted by class
    images, labels = images[keep], labels[keep]
    start = time.time()
    x0 = pipe.to_model_space(images)
    preds = diffusion_classify(lambda x, t, y: pipe.eps_fn(x, t, y), x0, pipe.num_classes,
                               pipe.schedule.alphas_cumprod.float(), seed=seed)
    report = per_class_accuracy(preds.cpu(), labels, pipe.num_classes)
    return {"accuracy": report["accuracy"], "per_class": report["per_class"], "images": len(images),
            "seconds": time.time() - start}


def classify_run(pipe, out_dir, args, seed):
    """generate.py --classify: classify held-out real images with the denoiser itself."""
    check_heldout_classes(pipe.cfg, pipe.class_names, pipe.heldout_digest)
    images, labels = real_split(pipe.cfg, "val")
    limit = args.num_samples or 200
    with torch.inference_mode():
        result = diffusion_classifier_accuracy(pipe, images, labels, limit, seed)
    result.update(class_names=pipe.class_names, checkpoint=pipe.checkpoint_path, device=device_name(pipe.device))
    path = os.path.join(out_dir, "classify.json")
    write_json(result, path)
    print(f"diffusion classifier: accuracy {result['accuracy']:.4f} on {result['images']} held-out images "
          f"in {result['seconds']:.1f} s")
    for name, acc in zip(pipe.class_names, result["per_class"]):
        print(f"  {name:>24s}: {acc:.4f}")
    print(path)
    return result


def print_table(result, settings):
    rows = [("samples", f"{result['num_samples']} ({settings}, seeds from {result['seed']})"),
            ("sample accuracy (classifier)", f"{result['sample_accuracy']:.4f} "
                                             f"(balanced {result['sample_balanced_accuracy']:.4f})"),
            (f"real held-out accuracy ({result['real_heldout_split']})",
             f"{result['real_heldout_accuracy']:.4f} (balanced {result['real_heldout_balanced_accuracy']:.4f})"),
            ("ratio of the balanced accuracies", f"{result['accuracy_ratio']:.3f}"),
            ("classifier FD (vs train)", f"{result['classifier_fd']:.4f}"),
            (f"classifier FD real floor ({result['classifier_fd_real_floor_images']} val vs train)",
             f"{result['classifier_fd_real_floor']:.4f}"),
            ("classifier KID", f"{result['classifier_kid']:.5f} ± {result['classifier_kid_std']:.5f}"),
            ("near-copy fraction", f"{result['memorization']['near_copy_fraction']:.4f} "
                                   f"(held-out real: {result['memorization']['heldout_flagged_fraction']:.4f})")]
    if "fid" in result:
        rows += [("FID (Inception)", f"{result['fid']:.3f}"),
                 ("KID (Inception)", f"{result['kid_mean']:.5f} ± {result['kid_std']:.5f}")]
    if "diffusion_classifier" in result:
        rows.append(("diffusion-classifier accuracy", f"{result['diffusion_classifier']['accuracy']:.4f}"))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
