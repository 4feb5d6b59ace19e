"""OmegaConf resolvers used by the configs, so each fact is written once and derived elsewhere; the check that a
key a user adds on the command line is read by something; and the check that a group's option is picked with a
slash."""

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf

# Light on purpose: run.py imports this before Hydra composes, so that a mistyped override fails in a second,
# not after torch and Lightning load. What the resolvers compute is imported when one is first resolved.
import mrcnn.data.resolvers  # noqa: F401  (registers ${mrcnn.coco_classes:...})
from mrcnn.errors import raises_command_errors

# The project's Hydra configs (beside the package in this repository).
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def compose_config(
    overrides: Sequence[str] = (), run_dir: str | None = None, return_hydra_config: bool = False
) -> DictConfig:
    """``configs/train.yaml`` composed with Hydra ``overrides``, as ``run.py`` would build it, without running
    Hydra's app (tests, benchmarks, notebooks).

    Args:
        run_dir: sets ``run_dir`` (which otherwise reads the Hydra job's output folder, only known in a job).
        return_hydra_config: keep the ``hydra`` node (sweep settings, callbacks).
    """
    overrides = [*([f"run_dir={run_dir}"] if run_dir is not None else []), *overrides]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=return_hydra_config)
    check_model_contract(cfg)
    return cfg


# Model keys a user gives on the command line, left ??? by the config that needs them.
USER_INPUT_KEYS = ("model.backbone_weights",)


def check_model_contract(cfg: DictConfig) -> None:
    """Fails when a key the model's config groups must fill is still ``???``.

    ``configs/model/mask_rcnn.yaml`` declares, as ``???`` with one line each, what a ``model/backbone`` file must set
    (``featmap_names``, ``feature_channels``, ..., ``net.backbone``) and what ``model/roi_heads``, ``model/pooler``,
    ``model/mask_head`` and ``model/mask_loss`` fill under ``net.roi_heads``. Hydra composes such a config without
    complaint; building it would fail later, on the first read, far from the file at fault.

    Raises:
        ValueError: naming every unset key.
    """
    model = cfg.get("model")
    if not isinstance(model, DictConfig):
        return
    # Input files a setting asks the user for (setting=paper's ImageNet weights) are not part of the contract:
    # mrcnn.engine.config_checks.path_problems names them, with what the file must hold.
    missing = sorted(key for key in _missing_keys(model, "model") if key not in USER_INPUT_KEYS)
    if missing:
        keys = ", ".join(missing)
        raise ValueError(
            f"the model config leaves {keys} unset (???): configs/model/mask_rcnn.yaml declares what each "
            "model/backbone file must set (and what model/roi_heads, model/pooler, model/mask_head and "
            "model/mask_loss fill under model.net.roi_heads)"
        )


def _missing_keys(node: DictConfig | ListConfig, path: str) -> list[str]:
    """Dotted paths of the ``???`` values under ``node``, without resolving interpolations (which
    ``OmegaConf.missing_keys`` does, failing on the first one that points at a ``???``)."""
    missing = []
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        if OmegaConf.is_missing(node, key):
            missing.append(f"{path}.{key}")
        elif not OmegaConf.is_interpolation(node, key) and OmegaConf.is_config(node[key]):
            missing += _missing_keys(node[key], f"{path}.{key}")
    return missing


def _stage_channels(depth, stage, width=64) -> int:
    from mrcnn.modeling.backbone import stage_channels  # torchvision: only when a config reads it

    return stage_channels(int(depth), int(stage), int(width))


def register_resolvers() -> None:
    """Register the ``${mrcnn.*:...}`` resolvers of the configs (idempotent)."""
    resolvers = {
        # Channels of a ResNet stage, e.g. ${mrcnn.stage_channels:50,4} -> 1024; optional third argument: width.
        "mrcnn.stage_channels": _stage_channels,
        # One anchor size per FPN level: [32, 64] -> [[32], [64]].
        "mrcnn.per_level": lambda sizes: OmegaConf.create([[int(s)] for s in sizes]),
        # All anchor sizes on one feature map (C4/C5): [32, 64] -> [[32, 64]].
        "mrcnn.single_level": lambda sizes: OmegaConf.create([[int(s) for s in sizes]]),
        "mrcnn.mul": lambda a, b: a * b,
        "mrcnn.len": lambda seq: len(seq),
        # A value by where training runs: ${mrcnn.if_cpu:${trainer.accelerator},<on the CPU>,<else>}.
        "mrcnn.if_cpu": lambda accelerator, on_cpu, otherwise: on_cpu if str(accelerator) == "cpu" else otherwise,
    }
    # List-valued resolvers return a ListConfig so OmegaConf.resolve() can store them in place.
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, raises_command_errors(fn))


register_resolvers()


# Groups whose options switch another group's choice (configs/ablation/<name>/ overrides model/<name>): the ablated
# group, set on the command line beside them, would replace every variant's choice.
ABLATION_GROUPS = {"ablation/mask_loss": "model/mask_loss"}


def as_written(node):
    """A list or mapping of a config as written, its ``${...}`` not resolved; any other value as it is.

    Reading a config's list item by item resolves each item: a command-line override that holds an interpolation
    (``data.root=${oc.env:COCO}``, kept in ``hydra.overrides.task``) would read as ``data.root=/data/coco``, and
    one that cannot resolve here (``${oc.env:UNSET}``, ``${data.root}`` under ``hydra``) would raise."""
    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node


def task_overrides(hydra_cfg) -> list[str]:
    """A job's or a sweep's command-line overrides (``hydra.overrides.task``) as they were written (:func:`as_written`):
    the words of a command, compared with another command's and given back to run again."""
    return [str(override) for override in as_written(hydra_cfg.overrides.task)]


def override_key(override: str) -> str:
    """The key (or config group) a command-line override sets: ``+data.min_size=64`` -> ``data.min_size``,
    ``~model.pooler`` -> ``model.pooler``, ``model/pooler=roi_pool`` -> ``model/pooler``."""
    return override.lstrip("+~").split("=", 1)[0]


def check_ablation_overrides(choices: Mapping[str, str | None], overrides: Sequence[str]) -> None:
    """Fails when the command line sets the group an ``ablation/...`` group's options switch.

    ``experiment=ablation_mask_loss`` sweeps ``ablation/mask_loss`` (each option picks ``model/mask_loss``); a
    ``model/mask_loss=softmax`` beside it would give every variant that loss under its own label.

    Args:
        choices: the job's config group choices (``hydra.runtime.choices``).
        overrides: the job's command-line overrides (``hydra.overrides.task``).

    Raises:
        ValueError: naming the override and the ablation group to narrow instead.
    """
    for ablation, group in ABLATION_GROUPS.items():
        if choices.get(ablation) is None:
            continue
        for override in overrides:
            if override_key(override) == group:
                raise ValueError(
                    f"{override}: the {ablation} switch of this run picks {group} for each variant, so {group}= would "
                    f"give every variant the same one under its own label. Choose the variants with {ablation}=... "
                    f"(options: {', '.join(hydra_group_options(ablation)) or 'see configs/' + ablation})"
                )


def hydra_group_options(group: str) -> list[str]:
    """The options of a config group in the running Hydra app's search path (``[]`` if it is no group)."""
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return []
    return GlobalHydra.instance().config_loader().get_group_options(group)


_ABSENT = object()

# Mappings the code builds entry by entry, whatever their names (mrcnn.engine.build.instantiate_callbacks,
# mrcnn.engine.loggers.instantiate_loggers): an entry added, replaced or switched off (null) is read.
READ_ENTRY_BY_ENTRY = ("callbacks", "logger")


def check_added_keys(
    cfg: DictConfig,
    overrides: Sequence[str],
    group_options: Callable[[str], list[str]] | None = None,
    choices: Mapping[str, str | None] | None = None,
    recompose: Callable[[list[str]], DictConfig] | None = None,
    hydra_cfg: DictConfig | None = None,
) -> None:
    """Fails when a command-line override adds a key (``+key=value``, ``++key=value``) that nothing reads.

    Hydra answers a mistyped key, ``data.min_sise=64``, with "To append to your config use +data.min_sise=64";
    taken at its word, the run would go on with a key that nothing reads, and ``data.min_size`` unchanged. The same
    for ``+model.pooler=roi_pool`` meant as ``model/pooler=roi_pool``, and for ``+data.train_json=...`` without
    ``data=coco_format``. An added key is read when

    - it, or a mapping above it, has a ``_target_``: it is an argument of what that builds
      (``+trainer.profiler=simple``), if its class or function takes that argument, as far as its source tells
      (``+trainer.max_step=3`` is refused here, where Python would refuse it only once torch has loaded);
    - or it is an entry of ``callbacks`` or ``logger``, which are read entry by entry (``++logger.csv=null``);
    - or an interpolation reads it, or a mapping above it as a whole (``${data.augmentation}``), also in Hydra's own
      settings (``hydra.run.dir=outputs/${tag}``);
    - or the project reads it: it has a rule in :data:`mrcnn.engine.config_checks.SCHEMA` (every key of a shipped
      config has one, ``tests/test_config_schema.py``), unless it is a key of other options of its config group
      only (``data.train_json`` is ``data=coco_format``'s, and nothing reads it under ``data=shapes``).

    Args:
        cfg: the composed config, unresolved.
        overrides: the job's command-line overrides (Hydra's ``overrides.task``).
        group_options: the options of a config group (``"model/pooler"`` -> ``["roi_align", ...]``), to tell a
            group added with ``+`` from a key and to suggest ``model/pooler=<option>``; None: no groups known.
        choices: the option chosen for each config group (Hydra's ``runtime.choices``); None: not known.
        recompose: composes the config with other overrides, to tell whether a ``++`` key is there without it
            (an option may inherit it: ``model=small`` from ``model=mask_rcnn``); None: ``++`` keys are taken as added.
        hydra_cfg: Hydra's own settings of the job (``HydraConfig.get()``), whose interpolations may read a key.

    Raises:
        ValueError: naming the override, and the key or config group it probably meant.
    """
    from mrcnn.engine.config_checks import config_keys, rule_for
    from mrcnn.engine.target_source import target_parameters

    text = None  # the config and Hydra's settings as yaml, where interpolations are looked for: once, if needed
    for override in overrides:
        match = re.match(r"\+\+?([A-Za-z_][\w.]*)=", override)
        if match is None:
            continue
        key = match.group(1)
        options = group_options(key.replace(".", "/")) if group_options else []
        if key.split(".")[0] == "hydra" or (options and "." not in key):  # Hydra's own, or +group=option
            continue
        if (
            OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False, throw_on_resolution_failure=False)
            is _ABSENT
        ):
            continue  # not a key of the config: a config group's option (+experiment=...) adds no such key
        group = key.partition(".")[0]
        holders = _options_with_key(key, group_options) if group_options else []
        if text is None:
            text = OmegaConf.to_yaml(cfg, resolve=False)
            text += OmegaConf.to_yaml(hydra_cfg, resolve=False) if hydra_cfg is not None else ""
        read_by = _read_by(cfg, key, text, rule_for)
        if read_by == "target":
            _check_argument(cfg, key, override, target_parameters)
        # SCHEMA has a rule for every key of every option: a key of another option's (data=coco_format's
        # train_json, under data=shapes) has one, and nothing reads it.
        other_options_key = (
            read_by in (None, "schema") and bool(holders) and (choices or {}).get(group) not in (None, *holders)
        )
        if read_by is not None and not other_options_key:
            continue
        if override.startswith("++") and recompose is not None:
            # ++ also sets a key that is there already; composing without it says which (about 0.15 s, only here).
            without = recompose([o for o in overrides if o != override])
            if OmegaConf.select(without, key, default=_ABSENT, throw_on_missing=False) is not _ABSENT:
                continue
        value = override.split("=", 1)[1]
        message = f"{override}: nothing reads {key}, so it would change nothing."
        if other_options_key:
            message += (
                f" {key} is a key of {' and '.join(f'{group}={o}' for o in holders)}, not of {group}="
                f"{choices[group]}: choose it, and give {key}={value} without the +."
            )
        elif options:
            message += f" To choose a {key.replace('.', '/')} option, write {key.replace('.', '/')}={value} (options: "
            message += f"{', '.join(options)})."
        else:
            # A typo: the closest key beside it (``data.min_size`` for ``data.min_sise``).
            parent, _, name = key.rpartition(".")
            siblings = [
                k.rpartition(".")[2] for k, _ in config_keys(cfg) if k.rpartition(".")[0] == parent and k != key
            ]
            close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.75)
            if close:
                message += f" Did you mean {f'{parent}.' if parent else ''}{close[0]}={value} (no +)?"
        raise ValueError(message)


def _check_argument(cfg: DictConfig, key: str, override: str, parameters_of: Callable) -> None:
    """An added key one level below a ``_target_`` is an argument of what it builds: fails, before anything is
    imported, when that class or function takes no such argument (as far as its source tells,
    :func:`mrcnn.engine.target_source.target_parameters`); Python would refuse it only once torch has loaded."""
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None, throw_on_missing=False, throw_on_resolution_failure=False)
    if not isinstance(node, DictConfig) or "_target_" not in node or name.startswith("_"):
        return
    target = node._get_node("_target_")._value()
    if not isinstance(target, str) or "${" in target:
        return
    parameters = parameters_of(target)
    if parameters is None or name in parameters:
        return
    message = f"{override}: {target} takes no argument {name}, so it would fail once the run has started."
    close = difflib.get_close_matches(name, sorted(parameters), n=1, cutoff=0.75)
    if close:
        given = f"{parent}.{close[0]}={override.split('=', 1)[1]}"
        there = OmegaConf.select(cfg, f"{parent}.{close[0]}", default=_ABSENT, throw_on_missing=False) is not _ABSENT
        message += f" Did you mean {given if there else '+' + given}{' (no +)' if there else ''}?"
    raise ValueError(message)


def _options_with_key(key: str, group_options: Callable[[str], list[str]]) -> list[str]:
    """The options of the config group ``key`` starts with (``data``) whose file in ``configs/`` sets the rest of it
    (``train_json``)."""
    group, _, rest = key.partition(".")
    holders = []
    for option in group_options(group) if rest else []:
        path = Path(CONFIG_DIR, group, f"{option}.yaml")
        if not path.is_file():
            continue
        node = OmegaConf.to_container(OmegaConf.load(path))  # a ??? value counts: the option declares the key
        for part in rest.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            holders.append(option)
    return holders


def _read_by(cfg: DictConfig, key: str, text: str, rule_for: Callable) -> str | None:
    """What reads ``key`` of ``cfg`` (``text``: ``cfg`` as unresolved yaml): ``"target"`` (what it or a
    ``_target_`` above it builds), ``"entry"`` (of :data:`READ_ENTRY_BY_ENTRY`), ``"interpolation"``, ``"schema"``
    (a key the project reads), or ``None``; see :func:`check_added_keys`."""
    parts = key.split(".")
    ancestors = [".".join(parts[:i]) for i in range(1, len(parts))]
    for ancestor in [*ancestors, key]:
        node = OmegaConf.select(cfg, ancestor, default=None, throw_on_missing=False, throw_on_resolution_failure=False)
        if isinstance(node, DictConfig) and "_target_" in node:
            return "target"
    if len(parts) == 2 and parts[0] in READ_ENTRY_BY_ENTRY:
        return "entry"
    # ${key}, ${key.sub}, ${oc.select:key,default}; an ancestor only as a whole: ${ancestor} or ${oc.select:ancestor,...}
    resolver = r"\$\{(?:[\w.-]+:)?"
    if re.search(resolver + re.escape(key) + r"(?![\w])", text) or any(
        re.search(resolver + re.escape(ancestor) + r"(?=[},])", text) for ancestor in ancestors
    ):
        return "interpolation"
    return "schema" if rule_for(key) is not None else None


def where_built(message: str, cfg: DictConfig, choices: Mapping[str, str | None] | None = None) -> str:
    """Hydra's instantiation error ``message`` with the config key and the group option its ``full_key`` comes from.

    Hydra names where an object is built (``module.model.roi_heads.pooler``), which an interpolation may have
    brought from elsewhere (``module.model: ${model.net}``): the key to fix is ``model.net.roi_heads.pooler``, set
    by the config group ``model/pooler``.

    Args:
        cfg: the composed config, unresolved.
        choices: Hydra's ``runtime.choices`` (``{"model/pooler": "roi_align", ...}``).
    """
    match = re.search(r"full_key: ([\w.]+)", message)
    if match is None:
        return message
    key = config_key(cfg, match.group(1))
    if key is None:
        return message
    parts = key.split(".")
    # The most specific group whose name is a part of the key: model/pooler for model.net.roi_heads.pooler.
    best = None
    for group, option in (choices or {}).items():
        name = group.rpartition("/")[2]
        if option is not None and name in parts and (best is None or parts.index(name) > best[0]):
            best = (parts.index(name), f"{group}={option}")
    notes = ([f"written as {key}"] if key != match.group(1) else []) + ([f"chosen by {best[1]}"] if best else [])
    origin = f" ({', '.join(notes)})" if notes else ""
    return message[: match.end()] + origin + message[match.end() :]


def config_key(cfg: DictConfig, full_key: str) -> str | None:
    """The key ``full_key`` is written at, following interpolations of whole nodes (``${model.net}``)."""
    node, path = cfg, []
    for part in full_key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        child = node._get_node(part)
        reference = re.fullmatch(r"\$\{([\w.]+)\}", str(child._value())) if child._is_interpolation() else None
        if reference:
            path = reference.group(1).split(".")
            node = OmegaConf.select(cfg, reference.group(1), default=None, throw_on_missing=False)
        else:
            path.append(part)
            node = child
    return ".".join(path)


def check_group_overrides(args: Sequence[str], config_dir: str | Path = CONFIG_DIR) -> None:
    """Fails on a command-line override that picks a config group's option with a dot: ``model.backbone=c4``
    meant as ``model/backbone=c4``.

    Hydra reads ``model.backbone`` as a config key; there is none, so it fails with "Could not override
    'model.backbone' ... use +model.backbone=c4", which would add a key that nothing reads (where a key of that name
    exists, such as ``data.augmentation``, the override replaces a mapping with a string). Checked on the raw
    command line, before Hydra composes: the key with slashes is a group folder under ``config_dir``, and the value
    (each of a sweep's comma-separated values) is one of its options.

    Args:
        args: the command line after the script's name (flags and their values are passed over).
        config_dir: the folder of the config groups.

    Raises:
        ValueError: naming the override and the one that picks the option.
    """
    # Groups of other config folders (a search path, another config folder) are not checked here.
    searchpath = any(
        "hydra.searchpath" in arg or arg.startswith(("--config-dir", "-cd", "--config-path", "-cp")) for arg in args
    )
    for arg in args:
        missing = _missing_group(arg, config_dir) if not searchpath else None
        if missing is not None:
            raise ValueError(missing)
        # With + or ++ too: ++data.augmentation=photometric replaces the mapping with a string all the same.
        match = re.fullmatch(r"\+{0,2}([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)=(.+)", arg)
        if match is None:
            continue
        key, value = match.groups()
        group = Path(config_dir, *key.split("."))
        if not group.is_dir():
            continue
        options = sorted(p.stem for p in group.glob("*.yaml"))
        if all(v.strip() in options for v in value.split(",")):
            slashed = key.replace(".", "/")
            raise ValueError(
                f"{arg}: {slashed} is a config group; choose its option with {slashed}={value} (a slash: with a "
                f"dot, {key} names a config key; options: {', '.join(options)})."
            )


def _missing_group(arg: str, config_dir: str | Path) -> str | None:
    """What is wrong with ``arg`` when it picks an option of a config group that does not exist
    (``ablation/mask_los=softmax``, a typo), else ``None``.

    Hydra answers it with "To append to your config use +ablation/mask_los=softmax"; given a ``+``, it adds a key named
    ``ablation/mask_los`` that nothing reads, and a sweep over it trains every job for nothing. Hydra's own groups
    (``hydra/launcher=slurm``) and a package (``group@package=...``) are left to Hydra.
    """
    match = re.fullmatch(r"\+{0,2}([A-Za-z_][\w-]*(?:/[A-Za-z_][\w-]*)+)=(.*)", arg)
    if match is None or match.group(1).startswith("hydra/") or Path(config_dir, match.group(1)).is_dir():
        return None
    group = match.group(1)
    groups = sorted(p.relative_to(config_dir).as_posix() for p in Path(config_dir).rglob("*") if p.is_dir())
    close = difflib.get_close_matches(group, groups, n=1, cutoff=0.8)
    if close:
        options = sorted(p.stem for p in Path(config_dir, close[0]).glob("*.yaml"))
        return f"{arg}: there is no config group {group}; did you mean {close[0]} (options: {', '.join(options)})?"
    return f"{arg}: there is no config group {group} (the groups: {', '.join(groups)})"
