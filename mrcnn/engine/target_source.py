"""What a config's ``_target_`` names, read from the sources with ``ast``, without importing them.

``run.py`` checks the command line before it loads torch and Lightning: a ``_target_`` that names nothing
(:func:`target_problem`) and an argument added under one that its class or function does not take
(:func:`target_parameters`) are answered in about a second, not after the imports, nor in every job of a sweep.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import os
import pkgutil
import re
from pathlib import Path
from typing import NamedTuple


def target_problem(path: str) -> str | None:
    """Why the dotted ``path`` of a ``_target_`` names nothing, or ``None``; read without importing it.

    In this package the path is walked from the top: packages by their folders (their ``__init__`` is light), then
    the module's source, read with ``ast`` and not run, which must define (or import) the next name. Elsewhere only
    the top-level package is looked for (importing it to look further would load what run.py keeps for later).
    """
    parts = path.split(".")
    if parts[0] != "mrcnn":
        if importlib.util.find_spec(parts[0]) is None:
            return f"no module named {parts[0]!r} here: install it, or add its folder to PYTHONPATH"
        return None
    spec = importlib.util.find_spec("mrcnn")
    for i in range(1, len(parts)):
        module, name = ".".join(parts[:i]), parts[i]
        if spec.submodule_search_locations is not None:  # a package: the name may be one of its modules
            modules = [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
            if name in modules:
                spec = importlib.util.find_spec(f"{module}.{name}")  # imports the package's __init__, not the module
                continue
        names = _top_level_names(spec.origin, os.path.getmtime(spec.origin)) if _has_source(spec) else None
        if names is None or name in names:
            return None  # defined there, or the module's names cannot be told from its source: Hydra will tell
        package = spec.submodule_search_locations is not None
        close = difflib.get_close_matches(name, sorted([*names, *(modules if package else [])]), n=1, cutoff=0.75)
        hint = f" (did you mean {module}.{close[0]}?)" if close else ""
        if package:
            return f"no module {module}.{name}{hint}"
        return f"{os.path.relpath(spec.origin, _PACKAGE_ROOT)} defines no {name}{hint}"
    return None  # a module itself


def target_parameters(path: str) -> frozenset[str] | None:
    """The keyword arguments the class or function a ``_target_`` names takes, read from its source without importing
    it (Lightning's ``Trainer``: seconds to import); ``None`` where the source cannot tell (``**kwargs`` that go
    anywhere but the base class, an ``__init__`` generated other than by ``@dataclass``, several bases, a compiled
    module, a name it cannot follow).

    The dotted path is followed through packages' folders and through ``from ... import`` re-exports
    (``lightning.pytorch.Trainer`` is ``lightning/pytorch/trainer/trainer.py``'s), and a class's arguments through its
    base, wherever that is defined: a class without ``__init__`` takes its base's (a class without a base, none);
    an ``__init__`` that hands its ``**kwargs`` to ``super().__init__`` takes its own and its base's.
    """
    parts = path.split(".")
    folder = _package_folder(parts[0])
    found = _find_definition(folder, parts[0], parts[1:], depth=0) if folder is not None else None
    return _arguments(found, depth=0) if found is not None else None


class _Found(NamedTuple):
    """A class or function definition found in a module's source (or a name imported there, in ``node``'s place)."""

    node: ast.AST
    tree: ast.Module
    source: Path
    module: str
    package: bool  # source is the package's __init__.py: relative imports count from ``module`` itself


def _arguments(found: _Found, depth: int) -> frozenset[str] | None:
    """:func:`target_parameters` of a definition; ``depth`` bounds the chain of bases."""
    node = found.node
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None if node.args.kwarg is not None else _named_arguments(node)
    if not isinstance(node, ast.ClassDef) or depth > 8 or node.keywords:  # (a metaclass may make any __init__)
        return None
    if _makes_instances_otherwise(node):
        return None
    inits = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
    init = inits[-1] if inits else None  # the one Python keeps (typing.overload's stubs come first)
    if init is not None:
        if init.args.kwarg is None:
            return _named_arguments(init)
        if not _hands_kwargs_to_super(init):
            return None  # **kwargs used otherwise (WandbLogger's go to wandb.init): anything may be taken
    elif node.decorator_list:
        return _dataclass_fields(node)  # a generated __init__: a dataclass's fields; None for other decorators
    if not node.bases:
        return frozenset() if init is None else _named_arguments(init)  # object's __init__ takes nothing
    base = _base_class(found, depth) if len(node.bases) == 1 else None
    inherited = _arguments(base, depth + 1) if base is not None else None
    if inherited is None:
        return None
    return inherited if init is None else _named_arguments(init) | inherited


def _named_arguments(function: ast.FunctionDef | ast.AsyncFunctionDef) -> frozenset[str]:
    arguments = function.args
    return frozenset(a.arg for a in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]) - {"self"}


def _makes_instances_otherwise(node: ast.ClassDef) -> bool:
    """Whether a class body makes its instances other than by a plain ``def __init__`` at its top: a ``__new__``, or
    an ``__init__`` assigned, or defined under an ``if`` / ``try`` / ``with``."""
    for statement in node.body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if statement.name == "__new__" or (
                isinstance(statement, ast.AsyncFunctionDef) and statement.name == "__init__"
            ):
                return True
            continue
        if isinstance(statement, ast.ClassDef):
            continue
        for inner in ast.walk(statement):
            defined = [inner.name] if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)) else []
            if _bound_names(inner):
                defined = list(_bound_names(inner))
            if {"__init__", "__new__"} & set(defined):
                return True
    return False


def _hands_kwargs_to_super(init: ast.FunctionDef) -> bool:
    """Whether ``__init__``'s ``**kwargs`` go to ``super().__init__(..., **kwargs)`` whole, and nowhere else (one
    that reads them, ``kwargs.pop("x")``, takes arguments its base does not)."""
    name = init.args.kwarg.arg
    handed = 0
    for call in ast.walk(init):
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr == "__init__"
            and isinstance(call.func.value, ast.Call)
            and isinstance(call.func.value.func, ast.Name)
            and call.func.value.func.id == "super"
        ):
            handed += sum(k.arg is None and isinstance(k.value, ast.Name) and k.value.id == name for k in call.keywords)
    # A membership test (``if "x" in kwargs: raise ...``) takes nothing from them.
    tested = sum(
        isinstance(n, ast.Compare)
        and all(isinstance(op, (ast.In, ast.NotIn)) for op in n.ops)
        and any(isinstance(c, ast.Name) and c.id == name for c in n.comparators)
        for n in ast.walk(init)
    )
    used = sum(isinstance(n, ast.Name) and n.id == name for n in ast.walk(init))
    return handed > 0 and used == handed + tested


def _dataclass_fields(node: ast.ClassDef) -> frozenset[str] | None:
    """The ``__init__`` arguments of a ``@dataclass`` without bases: its annotated fields, but ``ClassVar`` ones and
    ``field(init=False)`` ones; ``None`` for any other decorator, ``init=False``, or bases."""
    (decorator,) = node.decorator_list if len(node.decorator_list) == 1 else (None,)
    call = decorator if isinstance(decorator, ast.Call) else None
    function = call.func if call is not None else decorator
    if node.bases or function is None or ast.unparse(function) not in ("dataclass", "dataclasses.dataclass"):
        return None
    if call is not None and any(k.arg == "init" and not _is_constant(k.value, True) for k in call.keywords):
        return None
    fields = set()
    for statement in node.body:
        if not isinstance(statement, ast.AnnAssign) or not isinstance(statement.target, ast.Name):
            continue
        value = statement.value
        if "ClassVar" in ast.unparse(statement.annotation) or (
            isinstance(value, ast.Call)
            and ast.unparse(value.func) in ("field", "dataclasses.field")
            and any(k.arg == "init" and not _is_constant(k.value, True) for k in value.keywords)
        ):
            continue
        fields.add(statement.target.id)
    return frozenset(fields)


def _bound_names(node: ast.AST) -> set[str]:
    """The names an assignment statement binds (``x = ...``, ``a, b = ...``; not ``x.attr = ...``); none for any
    other statement."""
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        targets = [node.target]
    else:
        return set()
    names, pending = set(), list(targets)
    while pending:
        target = pending.pop()
        if isinstance(target, ast.Name):
            names.add(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            pending.extend(target.elts)
        elif isinstance(target, ast.Starred):
            pending.append(target.value)
    return names


def _is_constant(node: ast.AST, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _base_class(found: _Found, depth: int) -> _Found | None:
    """The definition of a class's one base (``Base``, or ``module.Base`` for a module the class's module imports)."""
    (base,) = found.node.bases
    if isinstance(base, ast.Name):
        return _name_in_source(found.source, found.module, [base.id], depth + 1, found.package)
    dotted = ast.unparse(base)
    if not isinstance(base, ast.Attribute) or not re.fullmatch(r"[\w.]+", dotted):
        return None  # (Generic[T], a call, ...)
    first, _, rest = dotted.partition(".")
    for statement in found.tree.body:
        if isinstance(statement, ast.Import):
            for alias in statement.names:  # import torch.nn as nn; import torch
                if (alias.asname or alias.name.partition(".")[0]) == first:
                    dotted = f"{alias.name if alias.asname else first}.{rest}"
                    top, *below = dotted.split(".")
                    folder = _package_folder(top)
                    return _find_definition(folder, top, below, depth + 1) if folder is not None else None
        elif isinstance(statement, ast.ImportFrom) and not statement.level and statement.module:
            for alias in statement.names:  # from torch import nn
                if (alias.asname or alias.name) == first:
                    top, *below = f"{statement.module}.{alias.name}.{rest}".split(".")
                    folder = _package_folder(top)
                    return _find_definition(folder, top, below, depth + 1) if folder is not None else None
    return None


def _find_definition(folder: Path, module: str, rest: list[str], depth: int) -> _Found | None:
    """Where ``rest`` below package ``module`` (whose folder is ``folder``) is defined; None if unknown."""
    if depth > 40 or not rest:  # (a bound on re-export chains, against import cycles)
        return None
    if (folder / rest[0]).is_dir() and (folder / rest[0] / "__init__.py").is_file():
        return _find_definition(folder / rest[0], f"{module}.{rest[0]}", rest[1:], depth + 1)
    if (folder / f"{rest[0]}.py").is_file():
        return _name_in_source(folder / f"{rest[0]}.py", f"{module}.{rest[0]}", rest[1:], depth + 1, package=False)
    return _name_in_source(folder / "__init__.py", module, rest, depth + 1, package=True)


def _name_in_source(source: Path, module: str, rest: list[str], depth: int, package: bool) -> _Found | None:
    """Where the module ``module`` at ``source`` defines ``rest`` (its class or function), or the module a
    ``from ... import`` there brings it from does."""
    if len(rest) != 1 or not source.is_file():
        return None
    name = rest[0]
    tree = _parsed(str(source), source.stat().st_mtime)
    defined = [
        node
        for node in tree.body
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name
    ]
    assigned = any(name in _bound_names(node) for node in tree.body)
    if defined and assigned:
        return None  # bound again by an assignment (a wrapper, a lambda): not what the source's def says
    if defined:
        return _Found(defined[-1], tree, source, module, package)  # the one Python keeps
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        for alias in node.names:
            if (alias.asname or alias.name) != name:
                continue
            if node.level:  # relative: from the package (or the module's package) up
                base = module.split(".") if package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            top, *below = target.split(".")
            folder = _package_folder(top)
            return _find_definition(folder, top, [*below, alias.name], depth + 1) if folder is not None else None
    return None


@functools.lru_cache(maxsize=64)
def _parsed(path: str, mtime: float) -> ast.Module:
    """A module's source, parsed (not run); ``mtime``: a changed file is read again."""
    return ast.parse(Path(path).read_text(), path)


def _package_folder(name: str) -> Path | None:
    """The folder of the top-level package ``name``, found without importing it; None for a module or nothing."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _has_source(spec) -> bool:
    return spec is not None and spec.origin is not None and spec.origin.endswith(".py")


# The folder that holds the mrcnn package, for file names in messages.
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=64)
def _top_level_names(path: str, mtime: float) -> frozenset[str] | None:
    """The names a module's top level defines, assigns or imports (also under a top-level ``if`` / ``try``);
    ``None`` where its source cannot tell (``from x import *``, a module ``__getattr__``). ``mtime``: a changed
    file is read again."""
    names: set[str] = set()
    statements = list(_parsed(path, mtime).body)
    while statements:
        node = statements.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name == "__getattr__":
                return None
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(alias.name == "*" for alias in node.names):
                return None
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            names.update(_bound_names(node))
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody"):
                statements.extend(getattr(node, field, []))
            statements.extend(s for handler in getattr(node, "handlers", []) for s in handler.body)
    return frozenset(names)
