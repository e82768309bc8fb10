"""Demo data generator and the package's dependency direction."""

import ast
import hashlib

import numpy as np

from srpu_pipelines.config import IGNORE_INDEX
from srpu_pipelines.data.demo import generate_demo
from srpu_pipelines.data.masks import MaskCodec
from tests.conftest import ROOT


def _digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_demo_is_deterministic_and_never_overwrites(tiny_params, tmp_path):
    first = generate_demo(tiny_params)
    assert first == {"written": 8 * 2 + 4 + 1, "kept": 0}
    before = _digest(tiny_params.demo.out_dir)
    mask = tiny_params.demo.out_dir / "labeled/a/a_000_mask.png"
    mask.write_bytes(mask.read_bytes())  # a "corrected" label stays as it is
    assert generate_demo(tiny_params) == {"written": 0, "kept": 21}
    assert _digest(tiny_params.demo.out_dir) == before
    other = tmp_path / "again"
    p2 = tiny_params.model_copy(deep=True)
    p2.demo.out_dir = other
    generate_demo(p2)
    assert _digest(other) == before


def test_demo_masks_hold_three_phases_and_an_ignored_bar(demo_params):
    codec = MaskCodec.from_params(demo_params)
    m = codec.decode_file(demo_params.demo.out_dir / "labeled/b/b_001_mask.png")
    bar = demo_params.demo.info_bar
    assert (m[-bar:] == IGNORE_INDEX).all() and (m[:-bar] != IGNORE_INDEX).all()
    fr = np.bincount(m[:-bar].ravel(), minlength=3) / m[:-bar].size
    assert fr[0] > 0.2 and fr[1] > 0.2 and 0 < fr[2] < 0.15
    assert (demo_params.demo.out_dir / "labeled/b/b_001.tif").is_file()  # 16-bit sub-dataset


FORBIDDEN = {"dagster", "mlflow", "dvc"}
CORE = ["data", "models", "training", "analysis"]


def test_core_never_imports_the_orchestration_stack():
    for pkg in CORE:
        for f in (ROOT / "srpu_pipelines" / pkg).rglob("*.py"):
            tree = ast.parse(f.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                bad = {n.split(".")[0] for n in names} & FORBIDDEN
                assert not bad, f"{f.relative_to(ROOT)} imports {bad}"
