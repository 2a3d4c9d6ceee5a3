"""Tests of checkpoint.py and of the model checkpoints built on it: atomic, checksummed, pickle-free."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import checkpoint
from checkpoint import CheckpointError
from model import ModelConfig, VideoLM

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny policy saved with VideoLM.save, and the policy."""
    torch.manual_seed(0)
    policy = VideoLM(ModelConfig())
    path = str(tmp_path_factory.mktemp("ckpt") / "model")
    policy.save(path)
    return path, policy


def copy_of(path, tmp_path):
    import shutil
    target = str(tmp_path / "copy")
    shutil.copytree(path, target)
    return target


def test_save_writes_a_manifest_of_every_file_and_loads_back(saved):
    path, policy = saved
    with open(os.path.join(path, checkpoint.MANIFEST)) as f:
        listed = json.load(f)["sha256"]
    assert set(listed) == set(checkpoint.files_of(path)) and "model.safetensors" in listed and "config.json" in listed
    assert checkpoint.verify(path)
    loaded = VideoLM.load(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in policy.state_dict().items() if k.startswith("projector."))


def test_a_flipped_byte_is_refused_naming_the_file(saved, tmp_path):
    path = copy_of(saved[0], tmp_path)
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.seek(os.path.getsize(weights) - 100)             # inside a tensor, not the header
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="model.safetensors: checksum mismatch"):
        VideoLM.load(path)


def test_truncated_weights_without_manifest_name_the_file(saved, tmp_path):
    path = copy_of(saved[0], tmp_path)
    os.remove(os.path.join(path, checkpoint.MANIFEST))     # as an older or hand-made checkpoint
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read tensors"):
        VideoLM.load(path)


def test_nonfinite_weights_are_refused_at_load(saved, tmp_path):
    path = copy_of(saved[0], tmp_path)
    os.remove(os.path.join(path, checkpoint.MANIFEST))
    weights = os.path.join(path, "model.safetensors")
    state = checkpoint.load_tensors(weights)
    state["projector.0.weight"][0, 0] = float("nan")
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"model.safetensors: non-finite weights in \['projector.0.weight'\]"):
        VideoLM.load(path)


def test_a_broken_config_names_the_file(saved, tmp_path):
    path = copy_of(saved[0], tmp_path)
    os.remove(os.path.join(path, checkpoint.MANIFEST))
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write('{"model": {"vision": "tin')
    with pytest.raises(CheckpointError, match="config.json: unreadable"):
        VideoLM.load(path)


def test_state_round_trip_without_pickle(tmp_path):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))], betas=(0.8, 0.9))
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3, 2)
    optimizer.step()
    state = {"step": 4, "config": {"lr": 1e-3, "name": "x", "flag": True}, "before": {"accuracy": 0.5},
             "rng": {"torch": torch.get_rng_state(), "generators": [torch.get_rng_state()] * 2},
             "optimizer": optimizer.state_dict()}
    checkpoint.save_state(str(tmp_path), "train_state", state)
    assert sorted(os.listdir(tmp_path)) == ["train_state.json", "train_state.safetensors"]
    back = checkpoint.load_state(str(tmp_path), "train_state")
    assert back["step"] == 4 and back["config"] == state["config"] and back["before"] == {"accuracy": 0.5}
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"]) and len(back["rng"]["generators"]) == 2
    restored = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, 2))])
    restored.load_state_dict({"state": {int(k): v for k, v in back["optimizer"]["state"].items()},
                              "param_groups": back["optimizer"]["param_groups"]})
    assert torch.equal(restored.state[restored.param_groups[0]["params"][0]]["exp_avg"],
                       optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"])
    assert tuple(restored.param_groups[0]["betas"]) == (0.8, 0.9)


def test_a_crash_before_the_rename_keeps_the_previous_directory(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt")
    checkpoint.write_dir(path, lambda d: open(os.path.join(d, "a.txt"), "w").write("one"))

    def crash(directory):
        open(os.path.join(directory, "a.txt"), "w").write("two")
        raise KeyboardInterrupt("killed while writing")
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_dir(path, crash)
    assert checkpoint.latest(path) == path and open(os.path.join(path, "a.txt")).read() == "one"
    checkpoint.write_dir(path, lambda d: open(os.path.join(d, "a.txt"), "w").write("three"))   # the leftover tmp goes
    assert open(os.path.join(path, "a.txt")).read() == "three" and not os.path.exists(path + ".tmp")


def test_kill_9_while_saving_never_leaves_a_broken_model(saved, tmp_path):
    """A process saving the same model directory over and over is killed with SIGKILL at several
    moments; every time, the directory loads (the previous or the new copy, never a mix)."""
    target = str(tmp_path / "sft")
    script = (f"import sys; sys.path.insert(0, {HERE!r})\n"
              "import torch; from model import VideoLM\n"
              f"policy = VideoLM.load({saved[0]!r})\n"
              f"policy.save({target!r})\n"
              "print('ready', flush=True)\n"
              f"while True: policy.save({target!r})\n")
    for delay in (0.05, 0.2, 0.35):
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        found = checkpoint.latest(target)
        assert found is not None
        VideoLM.load(found)
