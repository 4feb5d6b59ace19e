"""Every ``mrcnn.<module>.<name>`` and every repository file that the docs, config comments and code comments name
exists.

Code moves (a class renamed, a module split); a name left behind in prose sends a reader nowhere. Names of the
OmegaConf resolvers (``${mrcnn.len:...}``) are resolvers, not modules; an attribute an instance sets in its class's
code (``self.nothing_to_score = ...``) counts as existing.
"""

import importlib
import inspect
import re
from pathlib import Path

from omegaconf import OmegaConf

import mrcnn.config  # noqa: F401  (registers the resolvers)

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    ROOT / "README.md",
    ROOT / "benchmarks" / "README.md",
    *sorted((ROOT / "experiments").rglob("*.md")),
    *sorted((ROOT / "configs").rglob("*.yaml")),
    *sorted((ROOT / "mrcnn").rglob("*.py")),
    *sorted((ROOT / "benchmarks").glob("*.py")),
    *sorted((ROOT / "tests").rglob("*.py")),
]
NAME = re.compile(r"(?<![\w/.])mrcnn(?:\.[A-Za-z_]\w*)+")
# Names the docs ask the reader to create, which must not exist yet: README's "Extending it" (tests/test_recipes.py
# reads its yaml).
TO_BE_WRITTEN = {"mrcnn.modeling.poolers.MyPooler"}


def _exists(name: str) -> bool:
    if OmegaConf.has_resolver(name):
        return True
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[i:]:
            if not hasattr(obj, attribute):
                # An instance attribute: set in the class's own code.
                return inspect.isclass(obj) and f"self.{attribute} " in inspect.getsource(obj)
            obj = getattr(obj, attribute)
        return True
    return False


def test_every_mrcnn_name_mentioned_exists():
    mentions: dict[str, list[str]] = {}
    for path in SOURCES:
        for name in NAME.findall(path.read_text()):
            mentions.setdefault(name, []).append(path.relative_to(ROOT).as_posix())
    assert len(mentions) > 100  # the search finds the names at all
    missing = {name: sorted(set(files)) for name, files in mentions.items() if not _exists(name)}
    assert set(missing) & TO_BE_WRITTEN == TO_BE_WRITTEN  # still mentioned, and still not there
    assert {name: files for name, files in missing.items() if name not in TO_BE_WRITTEN} == {}, missing


# A repository path ending in a file name; not one with a placeholder (<run>, *, {train,val}), nor a --out target.
PATH = re.compile(r"(?<![\w/.$])((?:mrcnn|configs|tests|benchmarks|experiments)/[\w./-]*\.(?:py|yaml|md|json|png|txt))")


def test_every_repository_file_mentioned_exists():
    mentions: dict[str, list[str]] = {}
    for source in SOURCES:
        text = source.read_text()
        for match in PATH.finditer(text):
            if text[max(0, match.start() - 6) : match.start()].endswith("--out "):
                continue
            mentions.setdefault(match.group(1), []).append(source.relative_to(ROOT).as_posix())
    assert len(mentions) > 50  # the search finds the paths at all
    missing = {path: sorted(set(files)) for path, files in mentions.items() if not (ROOT / path).exists()}
    assert missing == {}, missing
