"""Every key of every shipped config has a rule in ``mrcnn.engine.config_checks.SCHEMA``, and the rules catch bad values."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mrcnn.config import CONFIG_DIR
from mrcnn.engine.config_checks import SCHEMA, check_config, config_keys, config_problems, keys_without_rule, rule_for
from tests.helpers.config import compose_config

# Groups composed by other means: Hydra's own settings, experiments (sweeps over the groups walked here), and the RoI
# heads, which each model/backbone picks (c4: res5, c5 and fpn: standard; another pairing is refused).
_NOT_WALKED = ("hydra", "experiment", "ablation", "setting/experiment", "model/roi_heads")
# Data configs need their paths to compose their datasets' keys.
_DATA_PATHS = {
    "coco": ["data.root=/coco"],
    "cityscapes": ["data.root=/cityscapes"],
    "coco_format": ["data.train_json=/t.json", "data.train_images=/t", "data.val_json=/v.json", "data.val_images=/v"],
}


def group_options() -> list[list[str]]:
    """Compositions that together use every option of every config group (and the defaults).

    Composing is the slow part (about 0.6 s each), so round ``i`` takes the ``i``-th option of every group at
    once: as many compositions as the largest group has options.
    """
    root = Path(CONFIG_DIR)
    options = {}
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        group = folder.relative_to(root).as_posix()
        # setting/experiment/<setting>/<experiment>.yaml are picked by an experiment, not by a user: not a group.
        if (
            group.split("/")[0] not in _NOT_WALKED
            and group not in _NOT_WALKED
            and not group.startswith("setting/experiment")
        ):
            options[group] = sorted(option.stem for option in folder.glob("*.yaml"))
    rounds = [[]]
    for i in range(max(len(names) for names in options.values())):
        overrides = []
        for group, names in options.items():
            name = names[i % len(names)]
            overrides += [f"{group}={name}", *(_DATA_PATHS.get(name, []) if group == "data" else [])]
        rounds.append(overrides)
    return rounds


def test_every_key_of_every_group_option_has_a_rule_and_its_shipped_value_follows_it():
    """One composition per option (composing is the slow part): keys without a rule, and shipped values that
    break theirs, are gathered over all options and reported together."""
    missing, problems = {}, {}
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):  # once: composing inside it is fast
        configs = [(o, compose("train", overrides=["run_dir=/tmp/run", *o])) for o in group_options()]
    for overrides, cfg in configs:
        for key in keys_without_rule(cfg):
            missing.setdefault(key, " ".join(overrides) or "the defaults")
        problems.update({problem: overrides for problem in config_problems(cfg)})
    assert not missing, (
        "config keys without a rule (key: the overrides that compose it): "
        + ", ".join(f"{key}: {option}" for key, option in missing.items())
        + ". Add one line per key (or an fnmatch pattern) with its type and range to SCHEMA in "
        f"mrcnn/engine/config_checks.py, e.g. '{next(iter(missing))}': positive_int,"
    )
    assert not problems, problems


def test_a_key_without_a_rule_is_found():
    cfg = compose_config(["+data.unheard_of=3", "+model.net.roi_heads.new_knob=1"])
    assert keys_without_rule(cfg) == ["data.unheard_of", "model.net.roi_heads.new_knob"]


def test_patterns_cover_nested_keys():
    assert rule_for("data.datamodule.train_dataset.ann_file") is SCHEMA["data.datamodule.*_dataset.ann_file"]
    assert rule_for("model.net.roi_heads.box_predictor._target_") is SCHEMA["*._target_"]
    assert rule_for("no.such.key") is None


def test_interpolations_are_checked_where_they_are_written():
    keys = dict(config_keys(compose_config()))
    assert keys["data.image_size"] is True and keys["data.min_size"] is False  # ${data.image_size}
    # A value written over an interpolation is checked at that key.
    problems = config_problems(compose_config(["data.min_size=0"]))
    assert problems == ["data.min_size=0: must be a positive integer or a non-empty list of them"]


@pytest.mark.parametrize(
    "override,message",
    [
        # the examples (ZeroDivisionError, IndexError, negative interpolate sizes before)
        ("data.min_size=0", "data.min_size=0: must be a positive integer or a non-empty list of them"),
        ("data.min_size=[]", "data.min_size=[]: must be a positive integer or a non-empty list of them"),
        ("data.min_size=[800,-2]", "data.min_size=[800, -2]: must be a positive integer or a non-empty list"),
        ("data.max_size=-5", "data.max_size=-5: must be a positive integer"),
        ("model.anchor_sizes=[]", "model.anchor_sizes=[]: must be a non-empty list of positive integers"),
        ("model.rois_per_image=0", "model.rois_per_image=0: must be a positive integer"),
        ("data.classes=[]", "data.classes=[]: must be a non-empty list of distinct non-empty strings"),
        ("data.classes=[a,a]", "data.classes=['a', 'a']: must be a non-empty list of distinct"),
        ("predict.score_threshold=1.5", "predict.score_threshold=1.5: must be a number in [0, 1]"),
        ("predict.batch_size=0", "predict.batch_size=0: must be a positive integer"),
        ("model.depth=42", "model.depth=42: must be one of 18, 34, 50, 101, 152"),
        ("model.norm=batchnorm", "model.norm=batchnorm: must be one of 'frozen_bn', 'bn', 'syncbn', 'gn'"),
        ("mode=trian", "mode=trian: must be one of 'train', 'evaluate', 'predict'"),
        ("scheduler.milestones=[0.9,0.5]", "scheduler.milestones=[0.9, 0.5]: must be a list of increasing"),
        ("data.augmentation.hflip_prob=2", "data.augmentation.hflip_prob=2: must be a number in [0, 1]"),
        ("data.image_limits.max_pixels=0", "data.image_limits.max_pixels=0: must be a positive integer"),
        ("data.image_limits.max_aspect_ratio=0.5", "data.image_limits.max_aspect_ratio=0.5: must be a number >= 1"),
        ("model.box_score_thresh=-0.1", "model.box_score_thresh=-0.1: must be a number in [0, 1]"),
        ("callbacks.best_checkpoint.mode=best", "callbacks.best_checkpoint.mode=best: must be one of 'min', 'max'"),
        ("trainer.precision=8", "trainer.precision=8: must be one of"),
        ("seed=abc", "seed=abc: must be an integer >= 0, or null"),
    ],
)
def test_a_bad_value_stops_naming_the_key(override, message):
    with pytest.raises(ValueError, match="invalid config values") as error:
        check_config(compose_config([override]))
    assert message in str(error.value)


def test_data_config_keys_are_checked():
    problems = config_problems(compose_config(["data=coco", "data.root=/c", "data.max_annotations_per_image=0"]))
    assert problems == ["data.max_annotations_per_image=0: must be a positive integer, or null"]
