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
    # a key inside a value that is not a section (loss: auto) names it and how to set it
    d = tiny_params_dict(tmp_path)
    d["train"]["loss"], d["train"]["splits"] = "auto", ["train"]
    f.write_text(yaml.safe_dump(d))
    with pytest.raises(ParamsError, match=r"train\.loss is 'auto', not a section.*train\.loss="):
        load_params(f, ["train.loss.lovasz_weight=1"])
    with pytest.raises(ParamsError, match=r"train\.splits\.0 is 'train', not a section"):
        load_params(f, ["train.splits.0.x=1"])  # a list item that is a value, too
    p = load_params(f, ["train.loss={class_weights: auto, lovasz_weight: 0.5}"])
    assert p.train.loss.lovasz_weight == 0.5 and p.train.loss.class_weights == "auto"


def test_on_and_off_are_words_and_auto_keys_name_their_choices(tmp_path):
    """YAML 1.1 reads `off` as False, which no switch takes: params files and --set
    values read `on`/`off` as the words they are (only true/false are booleans)."""
    import yaml

    d = tiny_params_dict(tmp_path)
    d["train"]["compile"] = "OFF_MARK"
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(d).replace("OFF_MARK", "off"))
    p = load_params(f, ["train.channels_last=on", "train.resume=false", "train.augment.flips=no"])
    assert (p.train.compile, p.train.channels_last) == ("off", "on")
    assert p.train.resume is False and p.train.augment.flips is False
    with pytest.raises(ParamsError) as e:
        load_params(f, ["train.tile_size=100", "train.compile=maybe"])
    msg = str(e.value)
    assert "train.tile_size: Input should be a multiple of 32, or 'auto' (got 100)" in msg
    assert "train.compile: Input should be 'auto', 'on' or 'off' (got 'maybe')" in msg
    with pytest.raises(ParamsError, match=r"stages\.0\.train\.lr: .*or 'auto' \(got 'fast'\)"):
        load_params(ROOT / "params.yaml", ["stages.0.train.lr=fast"])
    assert load_params(f, ["train.lr=auto", "train.loss=auto"]).train.loss == "auto"


def test_missing_and_broken_files(tmp_path: Path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
