"""The README's two set-up commands: CI runs the second verbatim; the first names files that exist."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup_commands():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert text.index("```bash") < 20, "the set-up commands come first"
    assert len(setup_commands()) == 2


def test_ci_runs_the_readme_test_command():
    assert setup_commands()[1] in (ROOT / ".ci" / "run").read_text()


def test_main_command_names_existing_files():
    main = setup_commands()[0]
    for path in re.findall(r"(\S+\.py)\b", main):
        assert (ROOT / path).is_file(), path
