"""Discovery, validation and splitting of labelled pairs and pool images."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from srpu_pipelines.config import parse_params
from srpu_pipelines.data.index import BadInputError, build_index, load_index, write_index
from tests.conftest import color_mask, save, tiny_params_dict

rng = np.random.default_rng(0)


def make_pair(
    folder: Path,
    name: str,
    size=(32, 32),
    classes=(0, 1, 2),
    ext=".png",
    mask_dir: Path | None = None,
    mask_name: str | None = None,
) -> None:
    img = rng.integers(0, 255, size, np.uint8)
    idx = rng.choice(np.array(classes, np.uint8), size)
    save(folder / f"{name}{ext}", img)
    save((mask_dir or folder) / (mask_name or f"{name}_mask.png"), color_mask(idx))


def params_for(tmp_path: Path, **over):
    d = tiny_params_dict(tmp_path, **over)
    d["data"]["datasets"] = [
        {"name": "a", "labeled": str(tmp_path / "lab"), "raw": str(tmp_path / "raw")}
    ]
    (tmp_path / "lab").mkdir(exist_ok=True)
    (tmp_path / "raw").mkdir(exist_ok=True)
    return parse_params(d)


def test_demo_index_counts_and_fields(demo_params):
    idx = build_index(demo_params, show_progress=False)
    assert idx["counts"]["labeled"] == 8 and idx["counts"]["pool"] == 4
    it = idx["items"][0]
    assert set(it) >= {
        "id",
        "image",
        "mask",
        "image_sha256",
        "mask_sha256",
        "height",
        "width",
        "class_fractions",
        "split",
        "dataset",
    }
    assert len(it["image_sha256"]) == 64 and sum(it["class_fractions"]) == pytest.approx(
        1, abs=1e-4
    )
    assert {i["dataset"] for i in idx["items"]} == {"a", "b"}
    # stratified by sub-dataset: each sub-dataset of 4 gets 2 train, 1 val, 1 test
    for ds in ("a", "b"):
        splits = sorted(i["split"] for i in idx["items"] if i["dataset"] == ds)
        assert splits == ["test", "train", "train", "val"]


def test_write_is_idempotent(demo_params):
    idx = build_index(demo_params, show_progress=False)
    path = demo_params.data.index_path
    assert write_index(idx, path) is True
    mtime = Path(path).stat().st_mtime_ns
    assert write_index(build_index(demo_params, show_progress=False), path) is False
    assert Path(path).stat().st_mtime_ns == mtime
    assert load_index(path) == idx


def test_adding_images_never_moves_old_ones(tmp_path):
    p = params_for(tmp_path)
    for i in range(10):
        make_pair(tmp_path / "lab", f"img{i:02d}")
    first = build_index(p, show_progress=False)
    write_index(first, p.data.index_path)
    for i in range(10, 25):
        make_pair(tmp_path / "lab", f"img{i:02d}")
    second = build_index(p, show_progress=False)
    old = {i["id"]: i["split"] for i in first["items"]}
    new = {i["id"]: i["split"] for i in second["items"]}
    assert all(new[k] == v for k, v in old.items())
    # val and test exist: they are fixed, every new image of the sub-dataset trains
    assert {v for k, v in new.items() if k not in old} == {"train"}
    assert {k for k, v in new.items() if v != "train"} == {
        k for k, v in old.items() if v != "train"
    }


def test_a_new_sub_dataset_gets_its_val_and_test_when_it_appears(tmp_path):
    p = params_for(tmp_path)
    for i in range(10):
        make_pair(tmp_path / "lab", f"img{i:02d}")
    write_index(build_index(p, show_progress=False), p.data.index_path)
    (tmp_path / "lab_b").mkdir()
    for i in range(10):
        make_pair(tmp_path / "lab_b", f"b{i:02d}")
    q = p.model_copy(deep=True)
    q.data.datasets = [
        *p.data.datasets,
        p.data.datasets[0].model_copy(
            update={"name": "b", "labeled": tmp_path / "lab_b", "raw": None}
        ),
    ]
    idx = build_index(q, show_progress=False)
    got = {s for it in idx["items"] if it["dataset"] == "b" for s in [it["split"]]}
    assert got == {"train", "val", "test"}
    # a dataset whose first images were too few for val and test gets them later
    write_index(idx, q.data.index_path)
    (tmp_path / "lab_c").mkdir()
    make_pair(tmp_path / "lab_c", "c00")
    r = q.model_copy(deep=True)
    r.data.datasets = [
        *q.data.datasets,
        p.data.datasets[0].model_copy(
            update={"name": "c", "labeled": tmp_path / "lab_c", "raw": None}
        ),
    ]
    first = build_index(r, show_progress=False)
    write_index(first, r.data.index_path)
    for i in range(1, 8):
        make_pair(tmp_path / "lab_c", f"c{i:02d}")
    later = build_index(r, show_progress=False)
    assert {it["split"] for it in later["items"] if it["dataset"] == "c"} >= {"val", "test"}


def test_split_is_fixed_by_seed(tmp_path):
    p = params_for(tmp_path)
    for i in range(12):
        make_pair(tmp_path / "lab", f"img{i:02d}")
    a = build_index(p, show_progress=False)
    assert a == build_index(p, show_progress=False)
    p2 = params_for(tmp_path, seed=5)
    b = build_index(p2, show_progress=False)
    assert [i["split"] for i in a["items"]] != [i["split"] for i in b["items"]]


def test_rare_class_is_stratified(tmp_path):
    p = params_for(tmp_path)
    for i in range(8):  # only 8 of 20 images hold the rare class 2 ...
        make_pair(tmp_path / "lab", f"rare{i}", classes=(0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2))
    for i in range(12):
        make_pair(tmp_path / "lab", f"common{i}", classes=(0, 1))
    idx = build_index(p, show_progress=False)
    for split in ("train", "val", "test"):  # ... yet every split holds some
        assert any(i["split"] == split and i["class_fractions"][2] > 0 for i in idx["items"])


def test_split_file_is_honoured(tmp_path):
    for i in range(6):
        make_pair(tmp_path / "lab", f"s{i}")
    sf = tmp_path / "split.json"
    sf.write_text(
        json.dumps({"train": ["s0", "s1"], "val": ["s2"], "test": ["s3"], "extra": ["s4"]})
    )
    p = params_for(tmp_path, **{"data.split": {"split_file": str(sf)}})
    got = {i["name"]: i["split"] for i in build_index(p, show_progress=False)["items"]}
    assert (
        got["s0"] == "train" and got["s2"] == "val" and got["s3"] == "test" and got["s4"] == "extra"
    )
    assert got["s5"] in ("train", "val", "test")


def test_two_folder_layout_and_odd_names(tmp_path):
    d = tiny_params_dict(tmp_path)
    d["data"]["datasets"] = [
        {"name": "x", "labeled": str(tmp_path / "img"), "masks": str(tmp_path / "msk")}
    ]
    for name in ("plain", "with space", "Kathode_ü_µm", "ｆｕｌｌｗｉｄｔｈ"):
        make_pair(
            tmp_path / "img", name, mask_dir=tmp_path / "msk", mask_name=f"{name}.png", ext=".tif"
        )
    idx = build_index(parse_params(d), show_progress=False)
    assert sorted(i["name"] for i in idx["items"]) == sorted(
        ["plain", "with space", "Kathode_ü_µm", "ｆｕｌｌｗｉｄｔｈ"]
    )


def _bad_folder(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    make_pair(lab, "good")
    make_pair(lab, "good2")
    save(lab / "orphan_image.png", np.zeros((32, 32), np.uint8))
    save(lab / "lonely_mask.png", color_mask(np.zeros((32, 32), np.uint8)))
    make_pair(lab, "wrongsize")
    save(lab / "wrongsize_mask.png", color_mask(np.zeros((16, 32), np.uint8)))
    make_pair(lab, "badcolour")
    bad = color_mask(np.zeros((32, 32), np.uint8))
    bad[3, 3] = (1, 2, 3)
    save(lab / "badcolour_mask.png", bad)
    make_pair(lab, "truncated")
    t = lab / "truncated.png"
    t.write_bytes(t.read_bytes()[:60])
    (lab / "notes.txt").write_text("not an image")
    (tmp_path / "raw" / "broken pool.png").write_bytes(b"garbage")
    save(tmp_path / "raw" / "fine pool.png", np.zeros((40, 30), np.uint8))


EXPECTED = {
    "orphan_image.png": "image without a mask",
    "lonely_mask.png": "mask without an image",
    "wrongsize_mask.png": "differs from image",
    "badcolour_mask.png": "match no class",
    "truncated.png": "truncated",
    "notes.txt": "not an image file",
    "broken pool.png": "not a readable image",
}


def test_bad_input_error_lists_every_file(tmp_path):
    p = params_for(tmp_path)
    _bad_folder(tmp_path)
    with pytest.raises(BadInputError) as ei:
        build_index(p, show_progress=False)
    msg = str(ei.value)
    for name, reason in EXPECTED.items():
        line = next((ln for ln in msg.splitlines() if name in ln), None)
        assert line is not None and reason in line, (name, msg)


def test_bad_input_skip_lists_and_keeps_good(tmp_path):
    p = params_for(tmp_path, **{"data.on_bad_input": "skip"})
    _bad_folder(tmp_path)
    idx = build_index(p, show_progress=False)
    assert sorted(i["name"] for i in idx["items"]) == ["good", "good2"]
    assert [i["name"] for i in idx["pool"]] == ["fine pool"]
    skipped = {Path(s["path"]).name: s["reason"] for s in idx["skipped"]}
    for name, reason in EXPECTED.items():
        assert reason in skipped[name], (name, skipped)
    # nothing was deleted or rewritten
    assert (tmp_path / "lab" / "badcolour_mask.png").exists()


def test_missing_folder_names_the_key(tmp_path):
    d = tiny_params_dict(tmp_path)
    d["data"]["datasets"] = [{"name": "x", "labeled": str(tmp_path / "nowhere")}]
    with pytest.raises(FileNotFoundError, match=r"data\.datasets\[x\]\.labeled: folder .*nowhere"):
        build_index(parse_params(d), show_progress=False)


def test_labelled_pool_image_leaves_the_pool(tmp_path):
    p = params_for(tmp_path)
    make_pair(tmp_path / "lab", "one")
    shutil.copy(tmp_path / "lab" / "one.png", tmp_path / "raw" / "one.png")
    save(tmp_path / "raw" / "two.png", np.zeros((32, 32), np.uint8))
    idx = build_index(p, show_progress=False)
    assert [i["name"] for i in idx["pool"]] == ["two"]


def test_an_image_skipped_for_a_while_comes_back_to_its_split(tmp_path):
    p = params_for(tmp_path, **{"data.on_bad_input": "skip"})
    for i in range(10):
        make_pair(tmp_path / "lab", f"img{i}")
    first = build_index(p, show_progress=False)
    write_index(first, p.data.index_path)
    test_item = next(i for i in first["items"] if i["split"] == "test")
    mask = Path(test_item["mask"])
    good = mask.read_bytes()
    mask.write_bytes(b"being edited")  # skipped now ...
    for i in range(10, 14):
        make_pair(tmp_path / "lab", f"img{i}")
    second = build_index(p, show_progress=False)
    write_index(second, p.data.index_path)
    assert test_item["id"] in second["split_memory"]
    mask.write_bytes(good)  # ... and back, into the split it had
    third = build_index(p, show_progress=False)
    assert next(i for i in third["items"] if i["id"] == test_item["id"])["split"] == "test"


def test_single_image_strata_still_fill_val_and_test(tmp_path):
    p = params_for(tmp_path)
    combos = [(0, 1), (0, 2), (1, 2), (0,), (1,)]  # every image its own stratum
    for i, c in enumerate(combos):
        make_pair(tmp_path / "lab", f"s{i}", classes=c)
    d = tiny_params_dict(tmp_path, **{"data.split": {"rare_fraction": 0.5}})
    d["data"]["datasets"] = [{"name": "a", "labeled": str(tmp_path / "lab")}]
    splits = [i["split"] for i in build_index(parse_params(d), show_progress=False)["items"]]
    assert "val" in splits and "test" in splits, splits
    del p


def test_split_file_names_with_extensions_and_unmatched(tmp_path):
    for i in range(3):
        make_pair(tmp_path / "lab", f"s{i}")
    sf = tmp_path / "split.json"
    sf.write_text(json.dumps({"test": ["s0.tif"], "val": ["s1", "ghost"]}))
    p = params_for(tmp_path, **{"data.split": {"split_file": str(sf)}})
    idx = build_index(p, show_progress=False)
    got = {i["name"]: i["split"] for i in idx["items"]}
    assert got["s0"] == "test" and got["s1"] == "val"
    assert idx["split_file_unmatched"] == ["ghost"]


def test_two_masks_for_one_image_in_a_mask_folder(tmp_path):
    d = tiny_params_dict(tmp_path)
    d["data"]["datasets"] = [
        {"name": "x", "labeled": str(tmp_path / "img"), "masks": str(tmp_path / "msk")}
    ]
    make_pair(tmp_path / "img", "one", mask_dir=tmp_path / "msk", mask_name="one.png")
    save(tmp_path / "msk" / "one_mask.png", color_mask(np.zeros((32, 32), np.uint8)))
    with pytest.raises(BadInputError, match="two masks for 'one'"):
        build_index(parse_params(d), show_progress=False)


def test_pixel_size_from_sidecars_stored_and_params_override(tmp_path):
    """A Hitachi sidecar beside an image is its calibration, not a stray file; the
    index keeps each image's pixel size and its source; a params value wins."""
    p = params_for(tmp_path)
    for i in range(6):
        make_pair(tmp_path / "lab", f"s{i}", ext=".tif")
    (tmp_path / "lab" / "s0.txt").write_text("InstructName=SU8230\nPixelSize=4.96\n")
    make_pair(tmp_path / "raw", "u0")  # a pool image without a calibration
    idx = build_index(p, show_progress=False)
    by_id = {it["name"]: it for it in idx["items"]}
    assert by_id["s0"]["pixel_size_nm"] == pytest.approx(4.96)
    assert "PixelSize" in by_id["s0"]["pixel_size_source"]
    assert by_id["s1"]["pixel_size_nm"] is None and "unknown" in by_id["s1"]["pixel_size_source"]
    assert idx["pool"][0]["pixel_size_nm"] is None and idx["counts"]["skipped"] == 0
    d = json.loads(p.model_dump_json())
    d["data"]["datasets"][0]["pixel_size_nm"] = 7.5
    over = build_index(parse_params(d), show_progress=False)
    assert {it["pixel_size_nm"] for it in over["items"]} == {7.5}
    assert "params data.datasets[a].pixel_size_nm" in over["items"][0]["pixel_size_source"]


def _barred(folder: Path, name: str, mask_rows: int, h: int = 96, w: int = 80, bar: int = 16):
    """A noisy micrograph with a white data bar (black lettering) in its bottom rows and a
    colour mask ``mask_rows`` tall."""
    img = rng.integers(40, 200, (h, w)).astype(np.uint8)
    img[h - bar :] = 255
    img[h - bar + 4 : h - bar + 10, 5:60:4] = 0  # lettering
    save(folder / f"{name}.tif", img)
    idx = rng.choice(np.array([0, 1, 2], np.uint8), (mask_rows, w))
    save(folder / f"{name}_mask.png", color_mask(idx))


def test_the_data_bar_is_found_not_labelled_and_a_mask_may_stop_above_it(tmp_path):
    from srpu_pipelines.data.masks import MaskCodec, item_mask

    p = params_for(tmp_path)
    _barred(tmp_path / "lab", "full", 96)  # the mask covers the bar too
    _barred(tmp_path / "lab", "above", 80)  # the mask stops above the 16-row bar
    for i in range(4):
        make_pair(tmp_path / "lab", f"plain{i}")
    idx = build_index(p, show_progress=False)
    by = {it["name"]: it for it in idx["items"]}
    assert by["full"]["data_bar_rows"] == 16 and by["above"]["data_bar_rows"] == 16
    assert "detected" in by["full"]["data_bar_source"]
    assert all(by[f"plain{i}"]["data_bar_rows"] == 0 for i in range(4))
    codec = MaskCodec.from_params(p)
    for name in ("full", "above"):
        m = item_mask(by[name], codec)
        assert m.shape == (96, 80) and (m[80:] == 255).all() and (m[:80] != 255).all()
    # a mask short by another height than the bar's: refused, naming the key to set
    _barred(tmp_path / "lab", "odd", 70)
    with pytest.raises(
        BadInputError, match=r"odd_mask\.png: mask size .* 26 rows shorter.*data_bar: 26"
    ):
        build_index(p, show_progress=False)
    for f in ("odd.tif", "odd_mask.png"):
        (tmp_path / "lab" / f).unlink()
    # data_bar: none keeps every row as sample; a fixed number of rows wins over detection
    d = json.loads(p.model_dump_json())
    d["data"]["datasets"][0]["data_bar"] = 20
    with pytest.raises(
        BadInputError, match=r"above_mask\.png: mask size .* 16 rows shorter.*20 rows"
    ):
        build_index(parse_params(d), show_progress=False)
    for f in ("above.tif", "above_mask.png"):
        (tmp_path / "lab" / f).unlink()
    fixed = build_index(parse_params(d), show_progress=False)
    assert {it["data_bar_rows"] for it in fixed["items"]} == {20}
    _barred(tmp_path / "lab", "above", 80)
    d["data"]["datasets"][0]["data_bar"] = "none"
    with pytest.raises(BadInputError, match=r"above_mask\.png: mask size .* 16 rows shorter"):
        build_index(parse_params(d), show_progress=False)


def test_the_split_record_keeps_every_split_without_the_index(tmp_path):
    """`make clean-outputs` or a fresh clone loses outputs/index.json; the split record,
    versioned with the labels, gives every image its split back, remembered ones too,
    even where the seed would now split otherwise."""
    from srpu_pipelines.data.index import read_split_record
    from srpu_pipelines.pipeline.steps import run_index

    record = tmp_path / "splits.json"
    p = params_for(tmp_path, **{"data.split.record": str(record), "data.on_bad_input": "skip"})
    for i in range(12):
        make_pair(tmp_path / "lab", f"img{i:02d}")
    first = {it["id"]: it["split"] for it in run_index(p, progress=False)["index"]["items"]}
    assert read_split_record(record) == first
    stamp = record.stat().st_mtime_ns
    run_index(p, progress=False)  # the same splits: the record is not rewritten
    assert record.stat().st_mtime_ns == stamp
    away = next(k for k, v in first.items() if v == "test")
    Path(tmp_path / "lab" / f"{away.split('/', 1)[1]}_mask.png").write_bytes(b"being fixed")
    run_index(p, progress=False)
    assert read_split_record(record)[away] == "test"  # remembered while it is away
    make_pair(tmp_path / "lab", away.split("/", 1)[1])
    Path(p.data.index_path).unlink()  # outputs gone
    other_seed = params_for(
        tmp_path, seed=7, **{"data.split.record": str(record), "data.on_bad_input": "skip"}
    )
    again = run_index(other_seed, progress=False)["index"]["items"]
    assert {it["id"]: it["split"] for it in again} == first


def test_a_damaged_split_record_stops_the_index_naming_it(tmp_path):
    record = tmp_path / "splits.json"
    p = params_for(tmp_path, **{"data.split.record": str(record)})
    make_pair(tmp_path / "lab", "img0")
    record.write_text('{"version": 1, "splits": {"a/img0": "holdout"}}')
    with pytest.raises(ValueError, match=r"splits\.json: not an SRPU split record"):
        build_index(p, show_progress=False)
    record.write_text('{"version": 1, "spl')
    with pytest.raises(ValueError, match=r"splits\.json: not valid JSON"):
        build_index(p, show_progress=False)
    with pytest.raises(ValueError, match=r"data\.split\.record .* image folder"):
        params_for(tmp_path, **{"data.split.record": str(tmp_path / "lab" / "splits.json")})
