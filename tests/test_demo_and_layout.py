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
CORE = ["config.py", "io", "compute", "data", "models", "analysis", "training", "active_learning"]
# the package's layers, bottom first: a module imports only from lower layers (and its own
# subpackage); training and active_learning sit side by side and never import each other
LAYERS = [
    {"errors"},  # the user-error classes every layer raises: a leaf that imports nothing
    {"config", "io", "compute"},
    {"data"},
    {"models"},
    {"analysis"},
    {"training", "active_learning"},
    {"resources"},
    {"pipeline"},
    {"bench"},
    {"cli", "assets", "sensors", "definitions"},
]
TOP_LEVEL = {"__init__.py", "config.py", "errors.py", "cli.py", "definitions.py"}


def _unit(module: str) -> str | None:
    """``srpu_pipelines.data.index`` -> ``data``; None outside the package."""
    parts = module.split(".")
    return parts[1] if parts[0] == "srpu_pipelines" and len(parts) > 1 else None


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_the_top_of_the_package_holds_only_config_cli_and_definitions():
    pkg = ROOT / "srpu_pipelines"
    loose = {p.name for p in pkg.iterdir() if p.suffix == ".py"} - TOP_LEVEL
    assert not loose, f"modules loose at the top of srpu_pipelines/: {sorted(loose)}"


def test_imports_point_one_way_down_the_layers():
    level = {u: i for i, layer in enumerate(LAYERS) for u in layer}
    pkg = ROOT / "srpu_pipelines"
    bad = []
    for f in pkg.rglob("*.py"):
        rel = f.relative_to(pkg)
        me = rel.parts[0].removesuffix(".py")
        if me == "__init__":
            continue
        assert me in level, f"{rel}: srpu_pipelines/{me} is in no layer of this test"
        for mod in _imports(f):
            other = _unit(mod)
            if other is None or other == me:
                continue
            same_top = level[other] == level[me] == len(LAYERS) - 1
            if level[other] > level[me] or (level[other] == level[me] and not same_top):
                bad.append(f"{rel} imports {mod} ({me} -> {other})")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_core_never_imports_the_orchestration_stack():
    for pkg in CORE:
        where = ROOT / "srpu_pipelines" / pkg
        for f in [where] if where.is_file() else where.rglob("*.py"):
            tree = ast.parse(f.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                bad = {n.split(".")[0] for n in names} & FORBIDDEN
                assert not bad, f"{f.relative_to(ROOT)} imports {bad}"
