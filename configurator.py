"""
What every entry point shares: its options, the learning-rate schedule, the process group.

Options, nanoGPT's way: each script (train.py, sft.py, eval.py, bench.py, ...) keeps its defaults as
plain globals at its top and calls

    given = configure(sys.argv[1:], globals())

which applies, in order, config files (a plain argument: `.json`, or `.py` holding only assignments
of literals such as `lr = 3e-4`; the file is parsed, never executed) and `--key=value` overrides.
A value must have the type of its default; an unknown key, a wrong type or a bad file ends the
program with a message naming the option and the file (an unknown key also names the closest known
ones: `--lr` -> `--learning_rate`). The set of keys given is returned, so a script can tell an
explicit choice from a default. `--help` (or `-h`) prints the script's docstring and every option
with its default and the comment beside it in the script's source: the one place options are defined.
"""
import ast
import difflib
import io
import json
import math
import os
import tokenize

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
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise SystemExit(f"{path}: cannot read the config file ({err})") from None
    if path.endswith(".json"):
        try:
            values = json.loads(text)
        except (ValueError, RecursionError) as err:   # RecursionError: nested past the parser's depth
            raise SystemExit(f"{path}: not valid JSON ({err if isinstance(err, ValueError) else 'nested too deep'})") from None
        if not isinstance(values, dict):
            raise SystemExit(f"{path}: expected a JSON object of options")
        return values
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as err:
        raise SystemExit(f"{path}:{err.lineno}: syntax error: {err.msg}") from None
    except (RecursionError, MemoryError):
        raise SystemExit(f"{path}: nested too deep to read as a config file") from None
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


def close_options(key, keys, n=4):
    """The known option names a mistyped `key` most likely meant: abbreviations by initials ("lr" ->
    learning_rate, lora_r), whole words of a name ("steps" -> max_steps), then difflib's close spellings."""
    initials = lambda name: "".join(word[:1] for word in name.split("_"))
    picks = [k for k in keys if initials(k) == key]
    picks += [k for k in keys if key in k.split("_") or (len(key) > 3 and key in k)]
    picks += difflib.get_close_matches(key, keys, n=n, cutoff=0.6)
    return list(dict.fromkeys(picks))[:n]


def option_comments(path):
    """{option name: the comment beside its assignment in a script's source, continuation lines joined} and
    {option name: the section heading above it}: the `name = value  # comment` lines at the top level."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    comments = {token.start[0]: (token.start[1], token.string.lstrip("#").strip())
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    lines, found, headings = source.splitlines(), {}, {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target = node.targets[0]
        names = [t.id for t in (target.elts if isinstance(target, ast.Tuple) else [target]) if isinstance(t, ast.Name)]
        text, line = [], node.end_lineno
        if line in comments and not lines[line - 1].lstrip().startswith("#"):
            column, first = comments[line]
            text.append(first)
            while line + 1 in comments and comments[line + 1][0] == column and not lines[line].split("#")[0].strip():
                line += 1
                text.append(comments[line][1])          # a continuation, aligned under the comment
        above = comments.get(node.lineno - 1)
        if above and above[0] == 0 and above[1] and not above[1].startswith(("-", "defaults")):
            for name in names:
                headings[name] = above[1]
        for name in names:
            found[name] = " ".join(text)
    return found, headings


def print_help(namespace, defaults):
    """What `--help` prints: the script's docstring, then its options, `--name=default  comment`."""
    path = namespace.get("__file__") or "script"
    script = os.path.basename(path)
    print((namespace.get("__doc__") or "").strip() or f"python {script}")
    print(f"\nusage: python {script} [CONFIG.py | CONFIG.json ...] [--key=value ...]   (later ones win)\n\noptions:")
    comments, headings = option_comments(path) if os.path.isfile(path) else ({}, {})
    for key, value in defaults.items():
        if key in headings:
            print(f"  [{headings[key]}]")
        shown = f"    --{key}=" + ('""' if value == "" else str(value))      # as it is typed
        note = comments.get(key, "")
        print(shown if not note else f"{shown:<40} {note}" if len(shown) < 40 else f"{shown}\n{'':<41}{note}")


def configure(argv, namespace):
    """Apply config files and --key=value overrides (later ones win) to the globals in `namespace`,
    starting from the defaults each time (a second call in one process does not inherit the first's
    choices). Returns the set of keys that were given. `--help` prints the options and exits."""
    defaults = namespace.setdefault("_defaults", {k: namespace[k] for k in option_keys(namespace)})
    namespace.update(defaults)
    keys = list(defaults)
    given = set()
    if "--help" in argv or "-h" in argv:
        print_help(namespace, defaults)
        raise SystemExit(0)

    def assign(key, value, source):
        if key not in keys:
            close = close_options(key, keys)
            script = os.path.basename(namespace.get("__file__") or "") or "the script"
            raise SystemExit(f"{source}: unknown option {key!r}"
                             + (f"; did you mean {' or '.join('--' + k for k in close)}?" if close else "")
                             + f" (python {script} --help lists them all)")
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
                raise SystemExit(f"expected --key=value, got {arg!r} (--help lists the options)")
            assign(key, value, "command line")
        else:
            for key, value in read_config_file(arg).items():
                if not key.startswith("_"):
                    assign(key, value, arg)
    return given


def check_values(namespace, choices, ranges):
    """Every option's value, the message naming the option: choices {name: allowed values}; ranges
    {name: (lowest, highest)}, None = unbounded; every float option must also be finite."""
    for name, allowed in choices.items():
        if namespace[name] not in allowed:
            raise SystemExit(f"--{name} must be one of {tuple(allowed)}, got {namespace[name]!r}")
    for name in option_keys(namespace):
        if isinstance(namespace[name], float) and not math.isfinite(namespace[name]):
            raise SystemExit(f"--{name} must be finite, got {namespace[name]}")
    for name, (low, high) in ranges.items():
        value = namespace[name]
        if value < low or (high is not None and value > high):
            raise SystemExit(f"--{name} must be " + (f"in [{low}, {high}]" if high is not None else f">= {low}")
                             + f", got {value}")


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
