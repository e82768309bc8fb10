"""The benchmarks' bookkeeping on tiny data (their figures come from real runs, not tests)."""

from srpu_pipelines.bench import _subset_index, bench_ssl
from srpu_pipelines.data.index import build_index


def test_subset_hides_the_other_training_masks(demo_params):
    idx = build_index(demo_params, show_progress=False)
    train = sorted(it["id"] for it in idx["items"] if it["split"] == "train")
    sub = _subset_index(idx, {train[0]})
    assert [it["id"] for it in sub["items"] if it["split"] == "train"] == [train[0]]
    pool_ids = {it["id"] for it in sub["pool"]}
    assert set(train[1:]) <= pool_ids and all("mask" not in it for it in sub["pool"])
    # validation and test images stay labelled and never join the pool
    assert not pool_ids & {it["id"] for it in idx["items"] if it["split"] != "train"}


def test_bench_ssl_reports_every_arm_and_k(demo_params, tmp_path):
    res = bench_ssl(
        demo_params,
        ks=[1, 2],
        seeds=1,
        budget_s=None,
        steps=1,
        mae_budget_s=None,
        mae_steps=1,
        work_dir=tmp_path / "bench",
        progress=False,
    )
    assert set(res["table"]) == {"scratch", "mae", "mae_semi"}
    assert set(res["table"]["mae"]) == {"k1", "k2"}
    assert len(res["runs"]) == 6 and all(r["steps"] == 1 for r in res["runs"])
    assert set(res["paired_gain"]) == {"mae-scratch", "mae_semi-scratch"}
    assert res["mae"]["steps"] == 1
