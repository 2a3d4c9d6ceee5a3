"""
What every entry point shares: its options, the learning-rate schedule, the process group.

Options, nanoGPT's way: each script (train.py, sft.py, eval.py, bench.py, ...) keeps its defaults as
plain globals at its top and calls

    given = configure(sys.argv[1:], globals())

which applies, in order, config files (a plain argument: `.json`, or `.py` holding only assignments
of literals such as `lr = 3e-4`; the file is parsed, never executed) and `--key=value` overrides.
A value must have the type of its default; an unknown key, a wrong type or a bad file ends the
program with a message naming the option and the file. The set of keys given is returned, so a
script can tell an explicit choice from a default.
"""
import ast
import difflib
import json
import math
import os

import torch
import torch.distributed as dist


def option_keys(namespace):
    """The configurable names of a module's globals: lower-case (CONSTANTS are not options), public,
    of type bool / int / float / str."""
    return [k for k, v in namespace.items()
            if not k.startswith("_") and k == k.lower() and isinstance(v, (bool, int, float, str))]


def parse_value(text, default):
    """A command-line string as the type of `default`; ValueError if it is not one."""
    if isinstance(default, bool):
        if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ValueError
        return text.lower() in ("1", "true", "yes")
    if isinstance(default, str):
        return text
    if isinstance(default, float):
        return float(text)                  # also "1e-3", "nan", "inf": the range checks name those
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError from None
    return value


def read_config_file(path, skip_other=False):
    """{key: value} of a .json file, or of a .py file of `name = literal` lines (parsed, not run).
    skip_other=True reads the literal assignments of any Python file (a script's defaults, e.g.
    train.py's, without importing it) and passes over everything else."""
    if not os.path.isfile(path):
        raise SystemExit(f"config file {path!r} not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            values = json.loads(text)
        except ValueError as err:
            raise SystemExit(f"{path}: not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise SystemExit(f"{path}: expected a JSON object of options")
        return values
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as err:
        raise SystemExit(f"{path}:{err.lineno}: syntax error: {err.msg}") from None
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue                                   # a docstring
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        try:
            if not isinstance(target, ast.Name):
                raise ValueError
            values[target.id] = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            if skip_other:
                continue
            raise SystemExit(f"{path}:{node.lineno}: only `name = literal` assignments are allowed in a config "
                             "file (it is read, not executed)") from None
    return values


def configure(argv, namespace):
    """Apply config files and --key=value overrides (later ones win) to the globals in `namespace`,
    starting from the defaults each time (a second call in one process does not inherit the first's
    choices). Returns the set of keys that were given."""
    defaults = namespace.setdefault("_defaults", {k: namespace[k] for k in option_keys(namespace)})
    namespace.update(defaults)
    keys = list(defaults)
    given = set()

    def assign(key, value, source):
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3)
            raise SystemExit(f"{source}: unknown option {key!r}" + (f"; did you mean {close}?" if close else ""))
        default, given_as = namespace[key], value
        where = f"--{key}" if source == "command line" else f"{source}: {key}"
        if isinstance(value, str) and source == "command line":
            try:
                value = parse_value(value, default)
            except ValueError:
                value = None
        elif isinstance(default, float) and type(value) is int:
            value = float(value)
        if type(value) is not type(default):
            raise SystemExit(f"{where} expects a {type(default).__name__}, got {given_as!r}")
        namespace[key] = value
        given.add(key)

    for arg in argv:
        if arg.startswith("--"):
            key, sep, value = arg[2:].partition("=")
            if not sep:
                raise SystemExit(f"expected --key=value, got {arg!r}")
            assign(key, value, "command line")
        else:
            for key, value in read_config_file(arg).items():
                if not key.startswith("_"):
                    assign(key, value, arg)
    return given


def cosine_lr(step, total, warmup, peak):
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to 10 % of it at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ----------------------------------------------------------------------------- the process group

def setup_distributed():
    """(rank, world_size, device). Under torchrun: NCCL on CUDA, gloo on CPU; else (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def rank_and_world():
    """(rank, world_size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def shutdown_distributed():
    """Tear the process group down once every rank is done with it: the barrier keeps a rank that finishes
    first from closing its gloo pairs while rank 0 still writes results (without it, CI once saw a rank of a
    finished 2-process run abort at exit: "terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def reduce_sum(values, device):
    """Sum a list of floats over all processes (itself without a process group)."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_finished(done):
    """Whether every sequence on every process has finished generating. (N,) bool -> bool.
    Passed to VideoLM.generate: FSDP-sharded processes must make the same number of forward
    passes, so they stop together."""
    finished = torch.tensor(float(done.all()), device=done.device)
    if dist.is_initialized():
        dist.all_reduce(finished, op=dist.ReduceOp.MIN)
    return bool(finished.item())
