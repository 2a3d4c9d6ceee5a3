"""The house rules: the flat layout's sizes and import graph, and every entry point's options
(--help from the one place they are defined, close names for a typo)."""
import ast
import glob
import importlib
import os

import pytest

from configurator import close_options, configure, option_comments, option_keys

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 100
ENTRY_POINTS = ("train", "sft", "eval", "bench", "bench_gpu", "experiments", "bandits", "convert", "benchmarks",
                "oracle", "synth", "bench_policies", "bench_trl")


def project_modules():
    """{module name: its source} of every non-test module."""
    names = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "*.py"))]
    return {name: open(os.path.join(HERE, name + ".py"), encoding="utf-8").read()
            for name in names if not name.startswith("test_") and name != "conftest"}


# ----------------------------------------------------------------------------- sizes and imports

def test_modules_and_functions_stay_small():
    too_long = []
    for name, source in project_modules().items():
        lines, tree = len(source.splitlines()), ast.parse(source)
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name}.py: {lines} lines")
        too_long += [f"{name}.py: {node.name}() {node.end_lineno - node.lineno + 1} lines" for node in ast.walk(tree)
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                     and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not too_long, f"over {MAX_MODULE_LINES} lines a module or {MAX_FUNCTION_LINES} a function: {too_long}"


def test_imports_flow_one_way():
    # entry points -> train_step -> rollout / oracle / model -> grpo_rank, data; nothing imports train.py
    trees = {name: ast.parse(source) for name, source in project_modules().items()}
    graph = {}
    for name, tree in trees.items():
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        graph[name] = (imported & set(trees)) - {name}
    assert not [name for name, deps in graph.items() if "train" in deps]

    def reaches(start, target, seen=()):
        return any(dep == target or (dep not in seen and reaches(dep, target, seen + (dep,)))
                   for dep in graph.get(start, ()))
    assert not [name for name in graph if reaches(name, name)], "an import cycle"
    assert "grpo_rank" in graph and not graph["grpo_rank"]          # the loss stands alone


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_lists_every_option_with_its_default_and_comment(name, capsys):
    if name == "bench_trl":
        pytest.importorskip("trl")
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith(module.__doc__.strip().splitlines()[0])          # the docstring says what it is
    defaults = module._defaults
    assert defaults and set(defaults) == set(option_keys(vars(module)))
    comments, _ = option_comments(module.__file__)
    for key, value in defaults.items():
        line = next((l for l in shown.splitlines() if l.strip().startswith(f"--{key}=")), None)
        assert line is not None, f"{name}.py --help does not list --{key}"
        assert line.strip().startswith(f"--{key}={value if value != '' else chr(34) * 2}")
        if comments.get(key):                                                  # a long default pushes it down
            assert comments[key] in shown


def test_help_reads_the_comment_its_continuation_and_the_section():
    comments, headings = option_comments(os.path.join(HERE, "train.py"))
    assert comments["resume"] == "continue from out_dir/ckpt"
    assert comments["advantage"].endswith('| "pairwise_gain"')                  # the aligned continuation line
    assert comments["out_dir"] == "" and headings["out_dir"] == "I/O"
    assert headings["advantage"].startswith("GRPO_rank")


def test_an_unknown_option_names_the_closest_known_ones():
    keys = ["learning_rate", "lora_r", "max_steps", "sft_steps", "num_generations", "beta"]
    assert close_options("lr", keys)[:2] == ["learning_rate", "lora_r"]          # initials
    assert "max_steps" in close_options("steps", keys)                           # a word of the name
    assert close_options("num_generation", keys) == ["num_generations"]         # a spelling
    assert close_options("zzz", keys) == []
    train = importlib.import_module("train")
    with pytest.raises(SystemExit, match=r"unknown option 'lr'; did you mean .*--learning_rate.*train.py --help"):
        configure(["--lr=0.1"], vars(train))
    with pytest.raises(SystemExit, match=r"expected --key=value, got '--resume' \(--help lists the options\)"):
        configure(["--resume"], vars(train))
    importlib.reload(train)


# ----------------------------------------------------------------------------- the README

def test_the_readmes_loss_example_runs_as_written():
    import re
    import torch
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        example = re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    advantages = namespace["advantages"]
    assert advantages.shape == (1, 4) and abs(advantages.sum().item()) < 1e-6     # pushes sum to zero per group
    assert advantages[0, 1] == advantages.max() and advantages[0, 2] == advantages.min()   # best up, worst down
    assert namespace["logp"].grad is not None and torch.isfinite(namespace["logp"].grad).all()
