"""Config loading: base + job module + typed key=value overrides."""
import pytest

from trainer.config import Config, ConfigError, apply_overrides, base_config, load_config, parse_value


def test_job_module_over_base_by_name_and_path():
    by_name = load_config("ms1mv3_r50")
    by_path = load_config("trainer/configs/ms1mv3_r50.py")
    assert by_name == by_path
    assert by_name.network == "r50" and by_name.amp == "fp16"
    assert by_name.config_name == "ms1mv3_r50"
    # a key the job module does not set keeps the base default
    assert by_name.max_nan_steps == base_config().max_nan_steps


def test_recipes_match_insightface():
    r100 = load_config("ms1mv3_r100")
    glint = load_config("glint360k_r100")
    assert r100.network == glint.network == "r100"
    assert tuple(r100.margin_list) == (1.0, 0.5, 0.0)  # ArcFace
    assert tuple(glint.margin_list) == (1.0, 0.0, 0.4)  # CosFace
    assert glint.weight_decay == 1e-4 and r100.weight_decay == 5e-4
    assert r100.lr == glint.lr == 0.1 and r100.batch_size == 128


def test_overrides_convert_to_the_base_type():
    cfg = load_config("cpu_demo", ["lr=0.5", "max_steps=1e3", "tensorboard=false", "network=r18",
                                   "margin_list=(1.0,0.0,0.35)", "val_targets=a.bin,b.bin",
                                   "warmup_epoch=1", "augment={'flip': False}"])
    assert cfg.lr == 0.5 and isinstance(cfg.lr, float)
    assert cfg.max_steps == 1000 and isinstance(cfg.max_steps, int)
    assert cfg.tensorboard is False
    assert cfg.network == "r18"
    assert cfg.margin_list == (1.0, 0.0, 0.35)
    assert cfg.val_targets == ["a.bin", "b.bin"]
    assert cfg.warmup_epoch == 1.0 and isinstance(cfg.warmup_epoch, float)
    assert cfg.augment == {"flip": False}


@pytest.mark.parametrize("override, message", [
    ("lrr=0.1", "did you mean lr"),
    ("lr", "not key=value"),
    ("max_steps=1.5", "integer"),
    ("tensorboard=maybe", "boolean"),
    ("lr=fast", "number"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("cpu_demo", [override])


def test_unknown_key_in_job_module(tmp_path):
    job = tmp_path / "typo.py"
    job.write_text("from trainer.config import Config\nconfig = Config()\nconfig.learning_rate = 1.0\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(str(job))
    with pytest.raises(ConfigError, match="no config"):
        load_config("no_such_config")


def test_config_attribute_access_and_copy():
    cfg = Config(a=1)
    cfg.b = [1]
    assert cfg["b"] == [1] and cfg.a == 1
    with pytest.raises(AttributeError):
        cfg.missing
    assert parse_value("None", None) is None
    assert parse_value("3", None) == 3
    assert apply_overrides(Config(x=(1, 2)), ["x=[3]"]).x == (3,)


def test_each_mode_adds_its_own_keys_and_rejects_the_others():
    standard = load_config("cpu_demo")
    assert standard.mode == "standard" and standard.scale == 32.0 and standard.sample_rate == 1.0
    assert not any(k.startswith(("sst_", "lvface_", "aaface_")) for k in standard)
    sst = load_config("sst_mbf", ["sst_margin=0.2"])
    assert sst.sst_margin == 0.2 and "scale" not in sst and "loss" not in sst
    lvface = load_config("lvface_vit")
    assert lvface.lvface_switch_epoch == 40.0 and lvface.margin_list == (1.0, 0.5, 0.0)
    # The mode may come after its keys on the command line; the last mode= wins.
    cfg = load_config("sst_mbf", ["sst_scale=10", "mode=lvface", "mode=sst"])
    assert cfg.mode == "sst" and cfg.sst_scale == 10.0 and "lvface_switch_epoch" not in cfg
    with pytest.raises(ConfigError, match="'sst_scale' belongs to mode 'sst'.*mode is 'standard'"):
        load_config("cpu_demo", ["sst_scale=10"])
    with pytest.raises(ConfigError, match="'scale' belongs to mode 'standard'.*mode is 'sst'"):
        load_config("sst_mbf", ["scale=10"])
    with pytest.raises(ConfigError, match="mode must be one of"):
        load_config("cpu_demo", ["mode=nosuch"])


def test_a_job_module_with_a_key_of_another_mode_is_an_error(tmp_path):
    job = tmp_path / "job.py"
    job.write_text("from trainer.config import Config\nconfig = Config()\nconfig.aaface_lambda_fr = 2.0\n"
                   "config.mode = 'lvface'\n")
    with pytest.raises(ConfigError, match="'aaface_lambda_fr' belongs to mode 'aaface'.*mode is 'lvface'"):
        load_config(str(job))
    assert load_config(str(job), ["mode=aaface"]).aaface_lambda_fr == 2.0


def test_config_diff_names_what_changes_training_and_ignores_the_free_keys():
    from trainer.config import RESUME_FREE_KEYS, config_diff, describe_diff

    saved = load_config("cpu_demo")
    same = load_config("cpu_demo", ["max_steps=100", "frequent=1", "output=elsewhere", "progress_bar=false",
                                    "allow_config_change=true"])
    assert config_diff(saved, same) == {}
    changed = load_config("cpu_demo", ["lr=0.05", "batch_size=64", "network=r18"])
    diff = config_diff(saved, changed)
    assert set(diff) == {"lr", "batch_size", "network"}
    assert describe_diff(diff) == "batch_size 32 -> 64, lr 0.1 -> 0.05, network 'mbf' -> 'r18'"
    # a config read back from JSON (tuples as lists) is the same config; a key an older trainer lacked
    # is not compared
    import json

    as_json = json.loads(json.dumps(saved))
    del as_json["wandb"]
    assert config_diff(as_json, saved) == {}
    assert {"lr", "batch_size", "network", "num_epoch", "seed", "margin_list"}.isdisjoint(RESUME_FREE_KEYS)
