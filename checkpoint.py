"""
Checkpoint directories that a crash, a flipped byte or a crafted file cannot turn into a wrong model:

- atomic: a directory is written beside its place (PATH.tmp) and renamed into place; the previous
  one stays until the new one is complete (a crash between the two renames leaves it at PATH.old,
  which `latest` finds);
- checksummed: MANIFEST lists the sha256 of every file, is written last, and is verified on load; a
  truncated or corrupted file is refused with its name;
- no pickle: tensors go to safetensors, everything else to JSON, so loading never runs code.

    write_dir(path, fill)             fill(tmp_dir) writes the files; then manifest, then rename
    verify(path)                      raises CheckpointError naming the first bad file
    resumable(path)                   --resume's checkpoint, verified; an existing one that is not is an error
    read_json(path)                   a JSON file, any damage reported as CheckpointError naming it
    local_parts(config, where, ids)   loading never goes to the network unless the hub id was asked for
    save_state(dir, name, state)      a nested dict of tensors, numbers, strings, lists -> name.json + name.safetensors
    load_state(dir, name)             and back
    save_training / restore_training  the RL checkpoint: model/, optimizer, RNG, step (full, unsharded
                                      state gathered from FSDP, so it loads on any world size)
"""
import hashlib
import json
import os
import shutil

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted or not finite. The message names the file."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, say). The message names it and the one kept."""


def read_json(path):
    """A JSON file of a checkpoint -> its value; missing, empty, truncated, not UTF-8 or nested past the
    parser's depth: CheckpointError naming the file (never a bare JSONDecodeError or RecursionError)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as err:
        reason = "nested too deep" if isinstance(err, RecursionError) else f"{type(err).__name__}: {err}"
        raise CheckpointError(f"{path}: unreadable ({reason})") from None


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_of(directory):
    """Every file below `directory`, as sorted relative paths with "/" separators (MANIFEST excluded)."""
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
            if relative != MANIFEST:
                found.append(relative)
    return sorted(found)


def verify(directory):
    """Check every file against MANIFEST. A directory without one (written by an older version, or
    by hand) is accepted unverified; returns whether it was verified."""
    manifest_path = os.path.join(directory, MANIFEST)
    if not os.path.exists(manifest_path):
        return False
    try:
        expected = dict(read_json(manifest_path)["sha256"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({err})") from None
    for relative, digest in expected.items():
        path = os.path.join(directory, relative)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: listed in {manifest_path} but missing")
        if sha256(path) != digest:
            raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted or was changed after saving)")
    return True


def replace_dir(tmp, path):
    """Move the complete directory `tmp` to `path`; the old `path` survives until then (as PATH.old
    for the instant between the two renames)."""
    old = path + ".old"
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_dir(path, fill):
    """Write a checkpoint directory atomically: fill(tmp) writes its files into a fresh temporary
    directory, then the manifest is written, then the directory replaces `path`."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        fill(tmp)
        digests = {relative: sha256(os.path.join(tmp, relative)) for relative in files_of(tmp)}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"sha256": digests}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:     # a full disk: no half-written PATH.tmp left behind, and say what is kept
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest(path)
        raise CheckpointWriteError(err.errno, f"{path}: the checkpoint could not be written ({err.strerror or err}); "
                                   + (f"the last complete one, {kept}, is kept" if kept else "there is no earlier one")
                                   ) from None
    replace_dir(tmp, path)


def latest(path, marker=MANIFEST):
    """PATH, or PATH.old when a crash came between the two renames of replace_dir; None if neither
    holds a complete checkpoint (one with `marker`)."""
    for candidate in (path, path + ".old"):
        if os.path.exists(os.path.join(candidate, marker)):
            return candidate
    return None


def resumable(path):
    """The checkpoint --resume continues from: PATH (or PATH.old, which a crash between replace_dir's two
    renames leaves), verified against its manifest; None when neither exists (no checkpoint was ever
    completed: a PATH.tmp is a save cut short). One that exists but does not verify (no manifest, a
    missing or changed file) raises CheckpointError saying what is wrong: never a silent fresh start over it.
    An older checkpoint's pickled train_state.pt is never loaded (unpickling can run code)."""
    if os.path.exists(os.path.join(path, "train_state.pt")) and not os.path.exists(os.path.join(path, MANIFEST)):
        raise CheckpointError(f"{path} is an older checkpoint with a pickled train_state.pt, which is never loaded "
                              "(unpickling can run code): start a new run, or resume with the version that wrote it")
    for candidate in (path, path + ".old"):
        if not os.path.exists(candidate):
            continue
        try:
            if not verify(candidate):
                raise CheckpointError(f"{candidate}: no {MANIFEST}, so not a complete checkpoint of this code")
            return candidate
        except CheckpointError as err:
            problem = str(err)
        older = path + ".old"
        if candidate == path and os.path.exists(os.path.join(older, MANIFEST)):
            problem += f"; the previous checkpoint {older} is still there: move it to {path} to resume from it"
        raise CheckpointError(f"resume refused: {problem}. Or start over: remove {candidate} or use another --out_dir")
    return None


def model_config_of(path, keys):
    """{key: value} of those `keys` that the model config (model/config.json) of the training checkpoint at path
    holds (a Qwen policy's has no vision or template); a config with none of them is CheckpointError naming it."""
    config_path = os.path.join(path, "model", "config.json")
    saved = read_json(config_path)
    saved = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(saved, dict) or not any(key in saved for key in keys):
        raise CheckpointError(f"{config_path}: not a model config with {', '.join(keys)}")
    return {key: saved[key] for key in keys if key in saved}


def local_parts(config, where, hub_ids=()):
    """Loading a checkpoint never goes to the network unless asked: its model config's vision, lm and
    tokenizer must be "tiny", empty or local directories; a hub id is allowed only when it is in hub_ids
    (what the user named on the command line). Otherwise CheckpointError naming the file and the part."""
    for part in ("vision", "lm", "tokenizer"):
        name = getattr(config, part)
        if name and name != "tiny" and not os.path.isdir(name) and name not in hub_ids:
            raise CheckpointError(f"{where}: {part} is {name!r}, not a local directory; loading a checkpoint downloads "
                                  f"nothing unless that hub id is given on the command line (train.py --{part}={name}, "
                                  f"eval.py --hub_ids={name}), or make it a local copy's path")


def nonfinite(state):
    """The names of the floating-point tensors of a state dict that hold NaN or inf."""
    return [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def load_tensors(path, finite=False):
    """safetensors -> {name: tensor}, a damaged file (or, with finite=True, NaN/inf weights) reported by name."""
    try:
        state = load_file(path)
    except Exception as err:   # safetensors raises its own SafetensorError, or OSError
        raise CheckpointError(f"{path}: cannot read tensors ({type(err).__name__}: {err})") from None
    if finite and nonfinite(state):
        raise CheckpointError(f"{path}: non-finite weights in {nonfinite(state)[:5]}")
    return state


def save_state(directory, name, state):
    """A nested dict of tensors and JSON values -> name.safetensors (the tensors) + name.json (the
    rest, with {"tensor": key} where a tensor stood). Tuples come back as lists."""
    tensors, storages = {}, set()

    def split(value, key):
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            if tensor.untyped_storage().data_ptr() in storages:    # safetensors stores no shared memory
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
            tensors[key] = tensor
            return {"tensor": key}
        if isinstance(value, dict):
            return {"dict": {str(k): split(v, f"{key}/{k}") for k, v in value.items()}}
        if isinstance(value, (list, tuple)):
            return {"list": [split(v, f"{key}/{i}") for i, v in enumerate(value)]}
        return {"value": value}

    tree = split(state, name)
    save_file(tensors, os.path.join(directory, name + ".safetensors"))
    with open(os.path.join(directory, name + ".json"), "w") as f:
        json.dump(tree, f)


def load_state(directory, name):
    """save_state's files -> the nested dict (dict keys come back as strings)."""
    path = os.path.join(directory, name + ".json")
    tree = read_json(path)
    tensors = load_tensors(os.path.join(directory, name + ".safetensors"))

    def join(node):
        if "tensor" in node:
            return tensors[node["tensor"]]
        if "dict" in node:
            return {k: join(v) for k, v in node["dict"].items()}
        if "list" in node:
            return [join(v) for v in node["list"]]
        return node["value"]
    try:
        return join(tree)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: malformed training state ({type(err).__name__}: {err})") from None


# ----------------------------------------------------------------------------- the RL checkpoint

def full_state(policy, optimizer):
    """Full (unsharded) model and optimizer state dicts, keyed by parameter names, on the CPU."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(policy, options=options), get_optimizer_state_dict(policy, optimizer, options=options)


def save_training(path, policy, optimizer, generator, state, master=True):
    """The policy (model/), the optimizer, every process's sampling RNG and `state` (step, counters, ...)
    in one checkpoint directory; one with non-finite weights is never written. All processes call it."""
    model_state, optim_state = full_state(policy, optimizer)
    generators = [generator.get_state().cpu()]
    if dist.is_initialized():
        generators = [None] * dist.get_world_size()
        dist.all_gather_object(generators, generator.get_state().cpu())
    if master:
        if nonfinite(model_state):
            raise RuntimeError(f"refusing to checkpoint non-finite weights ({nonfinite(model_state)[:3]}); "
                               f"last good checkpoint kept at {path}")
        rng = {"torch": torch.get_rng_state(), "generators": generators}

        def fill(directory):
            policy.save(os.path.join(directory, "model"), state=model_state)
            save_state(directory, "train_state", {**state, "optimizer": optim_state, "rng": rng})
        write_dir(path, fill)
    if dist.is_initialized():
        dist.barrier()


def restore_training(policy, optimizer, generator, state, seed, rank, world):
    """Continue from load_state(path, "train_state") -> (step, counters, before). The sampling stream
    continues where it was when the process layout is the same; else it is reseeded from the step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(policy, optimizer, optim_state_dict=state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(state["rng"]["torch"])
    if len(state["rng"]["generators"]) == world:
        generator.set_state(state["rng"]["generators"][rank].to(generator.get_state().device))
    else:
        generator.manual_seed(seed + 1000 * rank + state["step"])
    return state["step"], state["counters"], state["before"]


def load_weights(model, weights_path):
    """A policy checkpoint's weights file into `model` (strict=False: the parts rebuilt from their own path are
    not in it), checked first: every tensor finite, and exactly the tensors `model._saved(name)` says the
    checkpoint holds, at the model's shapes; otherwise a ValueError naming the file and the first differences."""
    state, own = load_tensors(weights_path, finite=True), model.state_dict()
    missing = [name for name in own if model._saved(name) and name not in state]
    unexpected = [name for name in state if name not in own]
    mismatched = [f"{name} {tuple(state[name].shape)} vs {tuple(own[name].shape)}"
                  for name in state if name in own and state[name].shape != own[name].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{weights_path}: checkpoint does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape (saved vs model) {mismatched[:5]}")
    model.load_state_dict(state, strict=False)
