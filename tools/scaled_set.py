"""Make the two-magnification benchmark set from nasa-super (for bench/nasa-super-scaled.yaml).

Real SEM sets mix microscopes and magnifications; the two sets here carry no calibration.
This stands in for that: every other image of each split (by sorted name) is kept as it
is (sub-dataset ``fine``, a link to the original), the others are shrunk 2x (sub-dataset
``coarse``: image by area averaging, mask by nearest neighbour, so its colours stay exact),
so the same microstructure reaches the network at two scales. bench/nasa-super-scaled.yaml
gives the two sub-datasets pixel sizes 10 and 20 nm (nominal: only their ratio matters).

    .venv/bin/python tools/scaled_set.py [SRC] [DEST]
    (default ../shared/data/nasa-super -> outputs/bench/nasa-super-scaled)

Nothing is copied: ``fine`` holds symbolic links; only the shrunk files are written.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def shrink(src: Path, dst: Path, mask: bool) -> None:
    im = Image.open(src)
    a = np.array(im)
    h, w = a.shape[:2]
    how = cv2.INTER_NEAREST_EXACT if mask else cv2.INTER_AREA
    out = cv2.resize(a, (w // 2, h // 2), interpolation=how)
    Image.fromarray(out, mode=im.mode).save(dst)


def main(src: Path, dest: Path) -> None:
    split = json.loads((src / "split.json").read_text())
    names = {n: s for s, ns in split.items() if s != "different_test" for n in ns}
    for sub in ("fine", "coarse"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for s in ("train", "val", "test"):
        for i, name in enumerate(sorted(n for n, k in names.items() if k == s)):
            sub = "fine" if i % 2 == 0 else "coarse"
            for suffix, is_mask in (("", False), ("_mask", True)):
                f = src / "labeled" / f"{name}{suffix}.tif"
                out = dest / sub / f.name
                if out.exists() or out.is_symlink():
                    continue
                if sub == "fine":
                    os.symlink(f.resolve(), out)
                else:
                    shrink(f, out, is_mask)
    (dest / "split.json").write_text(
        json.dumps({k: v for k, v in split.items() if k != "different_test"}, indent=1)
    )
    print(
        f"{dest}: fine {len(list((dest / 'fine').glob('*_mask.tif')))} images, "
        f"coarse {len(list((dest / 'coarse').glob('*_mask.tif')))} (2x smaller)"
    )


if __name__ == "__main__":
    a = sys.argv[1:]
    main(
        Path(a[0]) if a else Path("../shared/data/nasa-super"),
        Path(a[1]) if len(a) > 1 else Path("outputs/bench/nasa-super-scaled"),
    )
