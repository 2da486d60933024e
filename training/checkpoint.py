"""Checkpoints: the full training state plus the config, written atomically, read with
weights_only=True so a file from a stranger cannot run code."""
import os
import shutil
import pickle

import torch

from errors import UserError
from files import WriteError, atomic_path


CheckpointWriteError = WriteError  # a checkpoint could not be written; the previous one is intact


def save_checkpoint(state, path):
    """Write to a temporary file, flush and fsync, then rename over the old checkpoint: a crash
    or a full disk at any moment leaves the previous checkpoint intact."""
    # torch.save reports a failed write as RuntimeError
    with atomic_path(path, "checkpoint", errors=(OSError, RuntimeError)) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _durable_rename(os.path.dirname(os.path.abspath(path)))


def _durable_rename(folder):
    """After a rename in `folder`: make the rename itself durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def copy_checkpoint(source, path):
    """An atomic, durable copy (the finished run's sampling checkpoint)."""
    with atomic_path(path, "checkpoint") as tmp, open(source, "rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.flush()
        os.fsync(dst.fileno())
    _durable_rename(os.path.dirname(os.path.abspath(path)))


def all_finite(state):
    """Whether every floating-point tensor in a (nested) state dict is finite."""
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    return True


def load_checkpoint(path, what="checkpoint"):
    """Load a checkpoint safely; every problem becomes one clear UserError line."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if head and not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip; old files a pickle
        raise UserError(f"{path} is not a checkpoint: another kind of file (it begins {head!r})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first if len(first) <= 120 else first[:117] + "..."  # torch's long advice is not ours to give
        raise UserError(f"refusing to load {path}: it is not a plain-weights checkpoint "
                        f"(weights_only load failed: {first})") from None
    except Exception as e:  # noqa: BLE001 - torch.load of arbitrary bytes raises many types (IndexError, ...)
        raise UserError(f"{path} is not a readable checkpoint (truncated or another kind of file: "
                        f"{type(e).__name__})") from None
    if not isinstance(state, dict) or "config" not in state or "kind" not in state:
        raise UserError(f"{path} is not a checkpoint of this suite (no config/kind inside)")
    if not isinstance(state["config"], dict):
        raise UserError(f"{path} is damaged: its config is a {type(state['config']).__name__}, not a mapping "
                        f"of settings")
    return state


# Fields that define a model: a checkpoint whose values differ cannot be loaded into it.
ARCHITECTURE_FIELDS = {
    "vae_gan": ("dataset", "image_size", "vae_base_channels", "vae_channel_mults", "vae_res_blocks",
                "vae_block_attention", "latent_channels", "disc_channels", "attribute"),
    "conditional_diffusion": ("dataset", "model", "image_size", "base_channels", "channel_mults",
                              "num_res_blocks", "attention_resolutions", "num_heads", "time_embed_dim",
                              "schedule", "timesteps", "prediction", "attribute", "transformer_width",
                              "transformer_depth", "transformer_heads", "patch_size", "attention", "mlp_ratio",
                              "transformer_decoder_channels", "latent_channels"),
    "classifier": ("dataset", "image_size", "attribute"),
}


def check_compatible(state, cfg, kind, path):
    """Refuse a checkpoint from another dataset, model or incompatible config by name."""
    if state["kind"] != kind:
        raise UserError(f"{path} holds a {state['kind']} checkpoint, expected {kind}")
    saved = state["config"]
    ours = cfg.to_dict()
    for name in ARCHITECTURE_FIELDS[kind]:
        a, b = saved.get(name), ours.get(name)
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if a != b:
            raise UserError(f"{path} was trained with {name}={a!r}, but this run has {name}={b!r}")
