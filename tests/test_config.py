"""YAML configs: precedence, typos, types."""

import pytest

from guided_diffusion_vae.runtime.config import parse_with_config
from guided_diffusion_vae.runtime.errors import UserError
from guided_diffusion_vae.training.diffusion_training import pixel_train_defaults


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_then_flags_override(tmp_path):
    path = _write(tmp_path, "lr: 3.0e-4\nnum_channels: 64\nattention_resolutions: [8, 4]\nclass_cond: true\n")
    cfg = parse_with_config(pixel_train_defaults(), ["--config", path, "--lr", "2e-4"])
    assert cfg["lr"] == 2e-4  # the flag wins over the file
    assert cfg["num_channels"] == 64 and cfg["class_cond"] is True
    assert cfg["attention_resolutions"] == "8,4"
    assert cfg["batch_size"] == 1  # untouched default


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    cfg = parse_with_config(pixel_train_defaults(), ["--config", _write(tmp_path, "lr: 1e-4\n")])
    assert cfg["lr"] == pytest.approx(1e-4)


def test_misspelled_key_names_closest(tmp_path):
    path = _write(tmp_path, "num_channel: 64\n")
    with pytest.raises(UserError, match=r"unknown key 'num_channel'.*did you mean 'num_channels'"):
        parse_with_config(pixel_train_defaults(), ["--config", path])


def test_wrong_type_names_key_and_type(tmp_path):
    path = _write(tmp_path, "num_res_blocks: two\n")
    with pytest.raises(UserError, match=r"'num_res_blocks' must be an integer, got 'two'"):
        parse_with_config(pixel_train_defaults(), ["--config", path])
    path = _write(tmp_path, "class_cond: 1\n")
    with pytest.raises(UserError, match=r"'class_cond' must be a boolean"):
        parse_with_config(pixel_train_defaults(), ["--config", path])


def test_unknown_flag_and_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"unknown argument --learning_rat.*"):
        parse_with_config(pixel_train_defaults(), ["--learning_rat", "1"])
    with pytest.raises(UserError, match="did you mean '--batch_size'"):
        parse_with_config(pixel_train_defaults(), ["--batchsize", "4"])
    with pytest.raises(UserError, match="config file not found: .*nope.yaml"):
        parse_with_config(pixel_train_defaults(), ["--config", str(tmp_path / "nope.yaml")])


def test_list_flags(tmp_path):
    from guided_diffusion_vae.sampling.sample_from_checkpoint import sample_defaults

    cfg = parse_with_config(sample_defaults(), ["--user_ids", "1", "5", "10"])
    assert cfg["user_ids"] == ["1", "5", "10"]
    cfg = parse_with_config(sample_defaults(), ["--config", _write(tmp_path, "user_ids: [2, 3]\n")])
    assert cfg["user_ids"] == ["2", "3"]


def test_a_value_starting_with_a_minus_sign_belongs_to_its_flag(tmp_path):
    defaults = {"db_range": "auto", "lr": 1.0, "user_ids": []}
    config = parse_with_config(defaults, ["--db_range", "-60,0", "--lr", "-.5", "--user_ids", "3", "7"])
    assert config["db_range"] == "-60,0" and config["lr"] == -0.5 and config["user_ids"] == ["3", "7"]
    assert parse_with_config(defaults, ["--db_range=-60,0"])["db_range"] == "-60,0"
    (tmp_path / "c.yaml").write_text("db_range: [-80, 0]\n")
    assert parse_with_config(defaults, ["--config", str(tmp_path / "c.yaml")])["db_range"] == "-80,0"


def test_hostile_yaml_is_refused_quickly_in_one_short_line(tmp_path):
    """Issue 21: an oversized file, and an alias bomb whose values a wrong
    type would echo, are one short line each, in well under a second of work."""
    from guided_diffusion_vae.runtime.config import MAX_CONFIG_BYTES

    path = _write(tmp_path, "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(UserError, match=r"c\.yaml: larger than 1024 KiB"):
        parse_with_config(pixel_train_defaults(), ["--config", path])
    # A wrong type echoes at most errors.SHOWN_CHARS of the value.
    path = _write(tmp_path, "num_heads: [" + ",".join(["123456789"] * 20_000) + "]\n")
    with pytest.raises(UserError) as err:
        parse_with_config(pixel_train_defaults(), ["--config", path])
    assert "'num_heads' must be an integer, got [123456789" in str(err.value) and len(str(err.value)) < 300
