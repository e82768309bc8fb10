from pathlib import Path

import pytest

from srpu_pipelines.config import ParamsError, load_params, parse_params
from tests.conftest import ROOT, tiny_params_dict


def test_project_params_yaml_loads():
    p = load_params(ROOT / "params.yaml")
    assert p.class_names == ["active_material", "solid_electrolyte", "carbon"]
    assert p.model.arch == "unet"
    # the bench params for the real data parse too
    b = load_params(ROOT / "bench" / "nasa-super.yaml")
    assert b.mask.default_class == "matrix"


def test_unknown_key_names_the_key(tmp_path):
    d = tiny_params_dict(tmp_path)
    d["train"]["epoch"] = 3
    with pytest.raises(ParamsError, match=r"train\.epoch: unknown key"):
        parse_params(d)


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("train.lr", -1, r"train\.lr"),
        ("train.batch_size", "eight", r"train\.batch_size"),
        ("train.tile_size", 100, r"train\.tile_size"),
        ("inference.tile_size", 100, r"inference\.tile_size: .*multiple of 32"),
        ("model.decoder_channels", [8, 8], r"decoder_channels needs 3 entries"),
        ("mask.encoding", "rgb", r"mask\.encoding"),
        ("mask.default_class", "pores", r"default_class 'pores' is not a class"),
        ("data.split", {"val": 0.5, "test": 0.5}, r"val \+ test"),
        ("train.loss.class_weights", [1.0], r"class_weights needs 3"),
        ("data.on_bad_input", "ignore", r"data\.on_bad_input"),
    ],
)
def test_bad_values_name_the_key(tmp_path, key, value, pattern):
    d = tiny_params_dict(tmp_path, **{key: value})
    with pytest.raises(ParamsError, match=pattern):
        parse_params(d)


def test_duplicate_class_colour_rejected(tmp_path):
    d = tiny_params_dict(tmp_path)
    d["classes"][1]["color"] = d["classes"][0]["color"]
    with pytest.raises(ParamsError, match="colours must be unique"):
        parse_params(d)


def test_overrides_are_typed(tmp_path):
    import yaml

    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(tiny_params_dict(tmp_path)))
    p = load_params(f, ["train.epochs=7", "train.lr=0.01", "data.datasets.0.name=x"])
    assert p.train.epochs == 7 and p.train.lr == 0.01 and p.data.datasets[0].name == "x"
    with pytest.raises(ParamsError, match=r"train\.epochs"):
        load_params(f, ["train.epochs=many"])
    with pytest.raises(ParamsError, match="KEY=VALUE"):
        load_params(f, ["train.epochs"])


def test_missing_and_broken_files(tmp_path: Path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
