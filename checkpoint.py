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
    save_state(dir, name, state)      a nested dict of tensors, numbers, strings, lists -> name.json + name.safetensors
    load_state(dir, name)             and back
"""
import hashlib
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted or not finite. The message names the file."""


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
        with open(manifest_path) as f:
            expected = json.load(f)["sha256"]
    except (ValueError, KeyError, TypeError) as err:
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
    os.makedirs(tmp)
    fill(tmp)
    digests = {relative: sha256(os.path.join(tmp, relative)) for relative in files_of(tmp)}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump({"sha256": digests}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    replace_dir(tmp, path)


def latest(path, marker=MANIFEST):
    """PATH, or PATH.old when a crash came between the two renames of replace_dir; None if neither
    holds a complete checkpoint (one with `marker`)."""
    for candidate in (path, path + ".old"):
        if os.path.exists(os.path.join(candidate, marker)):
            return candidate
    return None


def load_tensors(path):
    """safetensors -> {name: tensor}, a damaged file reported by name."""
    try:
        return load_file(path)
    except Exception as err:   # safetensors raises its own SafetensorError, or OSError
        raise CheckpointError(f"{path}: cannot read tensors ({type(err).__name__}: {err})") from None


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
    try:
        with open(path) as f:
            tree = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read the training state ({err})") from None
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
