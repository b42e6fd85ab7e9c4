"""Every command shown in the README and in a docstring (configs/, sample.py, train.py, benchmarks/, the evaluator)
parses as its program parses it: the script or module exists, the config file loads, every --config.FIELD=VALUE
names a field and its value converts, other flags exist, and the settings pass the checks a run makes before it
reads any file (sample.py: exactly one of prompt / prompts_file; train.py: a workdir and the export settings). What
the commands then do is tested elsewhere (the demo's in test_shapes_demo, sample.py's in test_sample_script)."""
from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "sample.py", ROOT / "train.py", *sorted((ROOT / "configs").glob("*.py")),
           *sorted((ROOT / "benchmarks").glob("*.py")), ROOT / "sdjax" / "eval" / "shapes.py"]
DEFAULT_CONFIG = {"sample.py": "configs/sample.py", "benchmarks/sample.py": "configs/sample.py",
                  "benchmarks/train.py": "configs/tiny.py"}


def _commands_in(text: str) -> list[str]:
    """`python ...` commands: whole lines (backslash continuations joined, `# comments` dropped), `&&` chains split,
    and inline `python ...` code spans."""
    text = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in text.splitlines():
        for part in line.split("&&"):
            part = re.split(r"\s#\s", part.strip())[0].strip()
            if part.startswith("python ") and not part.startswith("python -m pytest"):
                found.append(part)
    for span in re.findall(r"`(python [^`]+)`", text):  # "python -m MODULE" alone names a program: not a command
        if not span.startswith("python -m pytest") and not re.fullmatch(r"python -m [\w.]+", span):
            found.append(span)
    return found


def documented_commands() -> list[tuple[str, str]]:
    out = [("README.md", c) for c in _commands_in((ROOT / "README.md").read_text())]
    for path in SOURCES:
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        out += [(str(path.relative_to(ROOT)), c) for c in _commands_in(docstring)]
    return list(dict.fromkeys(out))


COMMANDS = documented_commands()


def test_commands_are_collected():
    sources = {source for source, _ in COMMANDS}
    assert {"README.md", "sample.py", "train.py", "configs/shapes_sample.py", "benchmarks/train.py"} <= sources
    assert len(COMMANDS) >= 20


def parse_config(script: str, args: list[str]):
    """The config `script` would run with `args`, parsed by absl + ml_collections as the script parses them."""
    own = set(re.findall(r'DEFINE_\w+\("(\w+)"', (ROOT / script).read_text())) - {"config"}
    config_args, other = [], []
    for k, arg in enumerate(args):
        name = arg.lstrip("-").split("=", 1)[0]
        if name == "config" or name.startswith("config."):
            config_args.append(arg)
        elif arg.startswith("--"):
            other.append(name)
        elif k == 0 or args[k - 1] != "--config":
            pytest.fail(f"{script}: stray argument {arg!r}")
    assert set(other) <= own, f"{script} has no flag(s) {sorted(set(other) - own)}"
    argv = ["prog", *[a for k, a in enumerate(args) if a in config_args or (k and args[k - 1] == "--config")]]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG.get(script), "", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


@pytest.mark.parametrize("source, command", COMMANDS, ids=[f"{s}:{c[:60]}" for s, c in COMMANDS])
def test_documented_command_parses(source, command, monkeypatch):
    monkeypatch.chdir(ROOT)
    words = shlex.split(command)
    assert words[0] == "python"
    if words[1] == "-m":
        assert words[2] == "sdjax.eval.shapes", f"no test knows the module {words[2]}"
        from sdjax.eval import shapes

        shapes.argument_parser().parse_args(words[3:])
        return
    script = words[1]
    assert (ROOT / script).is_file(), script
    config = parse_config(script, words[2:])
    if script in ("sample.py", "benchmarks/sample.py"):
        assert bool(config.prompt) != bool(config.prompts_file) or script.startswith("benchmarks"), \
            "sample.py needs exactly one of --config.prompt and --config.prompts_file"
    if script == "train.py":
        from sdjax import checkpoint

        assert config.workdir
        checkpoint.check_export(tuple(config.export.formats), config.export.dtype, config.stage)
