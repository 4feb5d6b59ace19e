"""What the documentation tells a user to type composes, and passes the config checks.

Every ``python run.py ...`` command in README.md, benchmarks/README.md and experiments/ (the recorded runs'
commands), and every override README.md shows in backticks (``model.head_norm=syncbn``), is
composed with Hydra and checked by :func:`mrcnn.engine.config_checks.config_problems`, which ``run.py`` runs before
anything is built. Placeholders (``<file>``, ``...``, ``N``) are left out; a sweep (``a,b``) is checked at each value.
Paths need not exist: only the values are checked here.
"""

import functools
import itertools
import re
import shlex
from pathlib import Path

import pytest
from hydra.errors import HydraException

from mrcnn.engine.config_checks import config_problems
from tests.helpers.config import compose_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = {
    path.relative_to(ROOT).as_posix(): path.read_text()
    for path in [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "experiments").rglob("*.md"))]
}
# NAME="..." lines of the README's shell examples, expanded where a command uses $NAME.
SHELL_VARIABLES = dict(re.findall(r'^([A-Z]+)="([^"]*)"', README, flags=re.MULTILINE))
# Config groups and top-level keys of configs/train.yaml: an inline `key=value` whose key starts with none of them
# is some other code (`weights_only=True`, `sampling_ratio=2` of torchvision's RoIAlign), not an override.
ROOTS = tuple(compose_config([]).keys()) + ("setting", "experiment", "debug", "ablation")
OVERRIDE = re.compile(r"^\+{0,2}[a-z_]\w*(?:[./]\w+)*=\S+$")
# Overrides shown in a table of what a setting sets (setting=paper) or of a scheduler's keys compose under it.
CONTEXTS = ([], ["setting=paper"], ["scheduler=warmup_step_at"])


def _is_placeholder(arg: str) -> bool:
    key, equals, value = arg.partition("=")
    # <file>, <image or folder> (split into words), ..., a table's escaped "|", N devices.
    unset = not equals or any(c in arg for c in "<>\\") or "..." in arg
    return unset or re.fullmatch(r"[A-Z]", value) is not None


def _override_sets(args: list[str]) -> list[list[str]]:
    """The overrides of one command line, once per combination of its swept values (``-m``, Hydra's own keys and
    placeholders left out)."""
    choices = []
    for arg in args:
        if arg == "-m" or arg.startswith("hydra") or _is_placeholder(arg):
            continue
        key, _, value = arg.partition("=")
        values = value.split(",") if "," in value and not value.startswith("[") else [value]
        choices.append([f"{key}={v}" for v in values])
    return [list(combination) for combination in itertools.product(*choices)]


def _commands() -> list[str]:
    commands = set()
    for doc, text in DOCS.items():
        for match in re.finditer(r"python run\.py([^`\n]*)", text):
            line = match.group(1).split("#")[0].rstrip(" \\")
            for name, value in SHELL_VARIABLES.items():
                line = line.replace(f"${name}", value)
            try:
                shlex.split(line)
            except ValueError:  # prose around a placeholder ("<the run's overrides> resume=..."), not a command
                continue
            commands.add(f"{doc}: {line.strip()}")
    return sorted(commands)


def _inline_overrides() -> list[str]:
    spans = set()
    for match in re.finditer(r"`([^`\n]+)`", README):
        parts = match.group(1).split()
        if parts and all(OVERRIDE.match(p) and re.split(r"[./=]", p.lstrip("+"))[0] in ROOTS for p in parts):
            spans.add(match.group(1))
    return sorted(spans)


@functools.cache
def _problems(overrides: tuple[str, ...]) -> list[str]:
    """What is wrong with ``overrides`` in the first context where they compose (every context's error if none)."""
    errors = []
    for context in CONTEXTS:
        try:
            cfg = compose_config([*context, *overrides])
        except HydraException as error:
            errors.append(f"{context}: {str(error).splitlines()[0]}")
            continue
        return config_problems(cfg)
    return errors


def test_the_readme_has_commands_and_overrides_to_check():
    # The extraction itself: a change of the README's formatting must not make the tests below check nothing.
    assert len(_commands()) >= 60 and len(_inline_overrides()) >= 60
    assert "README.md: debug=fast" in _commands()
    assert any(c.startswith("experiments/ablation_mask_loss/") for c in _commands())
    assert "model.head_norm=syncbn" in _inline_overrides()


@pytest.mark.parametrize("command", _commands())
def test_every_run_py_command_composes_and_passes_the_checks(command):
    doc, _, line = command.partition(": ")
    for overrides in _override_sets(shlex.split(line)):
        assert _problems(tuple(overrides)) == [], f"{doc}: python run.py {line}"


@pytest.mark.parametrize("span", _inline_overrides())
def test_every_override_shown_composes_and_passes_the_checks(span):
    for overrides in _override_sets(span.split()):
        assert _problems(tuple(overrides)) == [], span
