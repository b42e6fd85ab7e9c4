"""The command-line front shared by sample.py and train.py: every settings error is one line and exit code 2.

    cli.run(main, prog="sample.py")     # in place of absl's app.run(main)

Flag parsing (absl, ml_collections' `--config.FIELD=VALUE` overrides) and `app.UsageError` end the process with
`<prog>: error: <what is wrong and the fix>` on stderr and exit code 2, never a traceback. An unknown field names
itself and the nearest valid ones (`--config.optimizer.lr: no such field; did you mean --config.optimizer.
learning_rate?`), nested fields included.
"""
from __future__ import annotations

import difflib
import importlib.util
import sys
from pathlib import Path

USAGE_ERROR = 2


def fail(prog: str, message: str) -> None:
    """Print `<prog>: error: <message>` as one line on stderr and exit with code 2."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def names(value) -> tuple[str, ...]:
    """A list setting as names: "a,b", or a sequence of such strings (a config's tuple field set on the command
    line as --config.x=a,b arrives as ("a,b",)); blanks dropped."""
    items = (value,) if isinstance(value, str) else value
    return tuple(t.strip() for item in items for t in str(item).split(",") if t.strip())


def one_line(message) -> str:
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    return "; ".join(lines)


def parse(argv: list[str], *, prog: str, config_flag: str = "config") -> list[str]:
    """absl's flag parsing of `argv` with its errors (ml_collections' too) turned into `fail`; returns the
    arguments left over. A script calls it before its heavy imports to report a mistyped setting in a blink."""
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
        if config_flag in flags.FLAGS and flags.FLAGS[config_flag].value is not None:
            flags.FLAGS[config_flag].value.keys()  # ml_collections defers a config file's load error to here
        return rest
    except Exception as e:  # absl's flags.Error, ml_collections' AttributeError / KeyError / TypeError / OSError
        fail(prog, explain_flag_error(argv, e, config_flag))


def run(main, *, prog: str, config_flag: str = "config", parsed: list[str] | None = None) -> None:
    """absl's `app.run(main)` with settings errors (flag parsing, `app.UsageError`) turned into `fail`; `parsed`:
    what `parse` returned when the script parsed its flags already."""
    from absl import app

    def checked_main(argv):
        try:
            return main(argv)
        except app.UsageError as e:
            fail(prog, str(e))

    app.run(checked_main, flags_parser=(lambda argv: parsed) if parsed is not None else
            (lambda argv: parse(argv, prog=prog, config_flag=config_flag)))


def explain_flag_error(argv: list[str], error: Exception, config_flag: str = "config") -> str:
    """The message for a failed parse of `argv`: an unknown config field by name with its nearest valid ones, a
    config file that does not load, else absl's own message."""
    path = _config_path(argv, config_flag)
    if path is None:
        return _flag_message(error)
    try:
        config = load_config_file(path)
    except Exception as e:  # the config file itself is broken or missing: say so, not the override
        return f"--{config_flag}={path}: cannot load it ({type(e).__name__}: {one_line(e)})"
    for name in _override_names(argv, config_flag):
        problem = unknown_field(config, name, prefix=config_flag)
        if problem:
            return problem
    return _flag_message(error)


def unknown_field(config, name: str, *, prefix: str = "config") -> str | None:
    """None if `name` (dotted) is a field of `config`, else what is wrong with it and the nearest valid names."""
    node, walked = config, [prefix]
    for part in name.split("."):
        if not hasattr(node, "keys"):
            return (f"--{prefix}.{name}: --{'.'.join(walked)} is a {type(node).__name__} value, it has no field "
                    f"{part!r}")
        if part in node.keys():
            node = node[part]
            walked.append(part)
            continue
        fields = sorted(node.keys())
        near = difflib.get_close_matches(part, fields, n=3, cutoff=0.5) or _abbreviated(part, fields)
        where = ".".join(walked)
        if near:
            return f"--{prefix}.{name}: no such field; did you mean {' or '.join(f'--{where}.{n}' for n in near)}?"
        return f"--{prefix}.{name}: no such field; --{where} has {', '.join(fields)}"
    return None


def _abbreviated(part: str, fields: list[str]) -> list[str]:
    """Fields that `part` abbreviates: their initials (lr -> learning_rate) or a prefix of them (opt -> optimizer)."""
    part = part.lower()
    return [f for f in fields if "".join(w[:1] for w in f.split("_")) == part or (len(part) > 1 and
                                                                                   f.startswith(part))][:3]


def load_config_file(spec: str):
    """`get_config()` of a config file given as ml_collections does: `path.py` or `path.py:argument`."""
    path, arg = (spec.split(".py:", 1)[0] + ".py", spec.split(".py:", 1)[1]) if ".py:" in spec else (spec, "")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist")
    module_spec = importlib.util.spec_from_file_location("_sdjax_cli_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _config_path(argv: list[str], config_flag: str) -> str | None:
    from absl import flags

    for k, arg in enumerate(argv[1:], start=1):
        if arg.startswith(f"--{config_flag}="):
            return arg.split("=", 1)[1]
        if arg == f"--{config_flag}" and k + 1 < len(argv):
            return argv[k + 1]
    try:
        return flags.FLAGS[config_flag].default_as_str.strip("'\"") or None
    except (KeyError, AttributeError):
        return None


def _override_names(argv: list[str], config_flag: str) -> list[str]:
    names = []
    for arg in argv[1:]:
        if arg.startswith(f"--{config_flag}."):
            names.append(arg[len(config_flag) + 3:].split("=", 1)[0])
        elif arg.startswith(f"--no{config_flag}."):  # absl's --noFLAG for booleans
            names.append(arg[len(config_flag) + 5:])
    return names


def _flag_message(error: Exception) -> str:
    message = one_line(error)
    return message.removeprefix("FATAL Flags parsing error: ")
