"""The paired benchmark protocol (benchmarks/lanes.py, benchmarks/train_overhead.py) and the generated
docs/BENCHMARKS.md (benchmarks/make_docs.py): lanes really interleave, a failing lane loses nothing,
the script runs on the CPU, and the committed page is exactly what the generator writes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

BENCH = Path(__file__).parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


lanes = _load("lanes")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Tiny(pl.LightningModule):
    def __init__(self, log: list[str], name: str, fail_at: int | None = None) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)
        self.log_, self.name, self.fail_at, self.n = log, name, fail_at, 0

    def training_step(self, batch, batch_idx):
        self.n += 1
        if self.n == self.fail_at:
            raise RuntimeError(f"{self.name} broke at step {self.n}")
        self.log_.append(self.name)
        return self.lin(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(log: list[str], name: str, fail_at: int | None = None):
    def fit(lane) -> None:
        trainer = pl.Trainer(
            max_steps=-1,
            max_epochs=-1,
            callbacks=[lane.clock],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        data = _endless(torch.randn(3, 4))
        trainer.fit(Tiny(log, name, fail_at), train_dataloaders=DataLoader(data, batch_size=None))

    return fit


def _endless(x):
    class Endless(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield x

    return Endless()


def test_lanes_interleave_in_reversed_rounds_and_a_failing_lane_loses_nothing():
    log: list[str] = []
    specs = {"a": None, "b": None, "c": 6}  # lane c fails in its second round (steps: 1 warm-up, 1 memory, 2 per block)
    ls = {n: lanes.Lane(n, _fit(log, n, fail), warmup=1, memory_steps=1, device="cpu") for n, fail in specs.items()}
    for lane in ls.values():
        lane.start()
        assert lane.ok and len(lane.solo_ms) == 1
    assert log == ["a", "a", "b", "b", "c", "c"], "each lane warms up and is measured alone, one after the other"
    log.clear()
    blocks: dict[str, list] = {n: [] for n in ls}
    for r in range(3):
        for n in lanes.round_order(list(ls), r):
            blocks[n].append(ls[n].run_block(2))
    for lane in ls.values():
        lane.stop()
    # round 0: a b c; round 1 reversed: c (one step, then it breaks) b a; round 2: a b (c is out)
    assert log == ["a"] * 2 + ["b"] * 2 + ["c"] * 2 + ["c"] + ["b"] * 2 + ["a"] * 2 + ["a"] * 2 + ["b"] * 2
    assert "broke at step 6" in ls["c"].error and blocks["c"][1:] == [None, None]
    assert all(len(b) == 2 and all(t > 0 for t in b) for n in "ab" for b in blocks[n])
    ratios = lanes.paired_ratios(blocks, [("b", "a"), ("c", "a")])
    assert ratios["b/a"]["n"] == 3 and ratios["c/a"]["n"] == 1
    s = ratios["b/a"]
    assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
    assert not any(lane._thread.is_alive() for lane in ls.values())


def test_train_overhead_quick_runs_on_the_cpu_and_writes_paired_json(tmp_path):
    """--quick: resnet18 at 32x32 through the real callbacks, eager lanes (ModelOpt's where installed)."""
    bench = _load("train_overhead")
    out = tmp_path / "paired.json"
    result = bench.main(["--quick", "--groups", "eager", "modelopt", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["protocol"] == result["protocol"] == "paired-rounds/1"
    rec = saved["models"]["resnet18"]
    assert rec["status"] == "done" and len(rec["rounds"]) == 5
    assert rec["rounds"][0]["order"] == list(reversed(rec["rounds"][1]["order"]))
    for name in ("amp", "amp_24", "amp_24_qat"):
        lane = rec["lanes"][name]
        assert lane["error"] is None, lane
        assert len(lane["blocks_ms"]) == 5 and all(len(b) == 2 for b in lane["blocks_ms"])
        assert lane["median_ms"] > 0 and lane["peak_mem_gib"] is None  # no CUDA: no peak memory
    for key in ("amp_24/amp", "amp_24_qat/amp"):
        s = rec["ratios"][key]
        assert s["n"] == 5 and s["min"] <= s["median"] <= s["max"]
    mo = "mo_24_qat/amp" in rec["ratios"]
    assert mo == (saved["modelopt"] is not None)
    if not mo:
        assert "not importable" in saved["skipped_lanes"]["mo_24_qat"]


def test_train_overhead_deadline_leaves_a_json_that_says_what_did_not_run(tmp_path):
    bench = _load("train_overhead")
    out = tmp_path / "cut.json"
    bench.main(["--quick", "--lanes", "amp", "--groups", "--deadline-s", "0", "--out", str(out)])
    rec = json.loads(out.read_text())["models"]["resnet18"]
    assert rec["status"].startswith("not started")


make_docs = _load("make_docs")


def test_benchmarks_page_is_what_the_generator_writes():
    assert make_docs.DOC.read_text() == make_docs.render(), "run: python benchmarks/make_docs.py"


def _paired_run(q: float, a: float, mem_q: float) -> dict:
    def lane(med: float, mem: float) -> dict:
        return {"error": None, "median_ms": med, "block_medians_ms": [med] * 5, "peak_mem_gib": mem, "setup_s": 1.0}

    def ratio(c: str, b: str, values: list[float]) -> dict:
        return {"candidate": c, "baseline": b, **lanes.ratio_stats(values)}

    return {
        "protocol": "paired-rounds/1",
        "command": "benchmarks/train_overhead.py",
        "environment": {"date": "2026-12-01T00:00:00+00:00", "torch": "2.11.0"},
        "gpu_start": {"name": "NVIDIA H200", "driver_version": "580", "clocks.sm": "1980", "clocks.max.sm": "1980"},
        "settings": {"rounds": 5, "block_steps": 10, "warmup": 10},
        "models": {
            "resnet50": {
                "batch": 128,
                "rounds": [{"order": [], "gpu": {"clocks.sm": "1980"}}] * 5,
                "lanes": {"c_amp": lane(a, 5.0), "c_amp_24_qat": lane(q, mem_q)},
                "ratios": {"c_amp_24_qat/c_amp": ratio("c_amp_24_qat", "c_amp", [q / a, 1.0, 1.2, 1.05, 1.08])},
            }
        },
    }


def test_generator_states_each_target_met_or_not_from_a_paired_run():
    results = {"x.json": _paired_run(q=21.0, a=20.0, mem_q=6.0)}
    page = make_docs.render("{{targets}}\n{{paired}}", results)
    lines = page.splitlines()
    qat = lines[lines.index("- **2:4 + INT8 QAT step with recompute=False, compiled vs compiled AMP ≤ 1.10×**") + 1]
    assert qat.startswith("  - ResNet-50: **met**: median 1.050× (min–max 1.000–1.200")
    assert "slowest round was above the target" in qat
    mem = lines[lines.index("- **peak memory of that step (recompute=False) vs compiled AMP ≤ 1.15×**") + 1]
    assert mem.startswith("  - ResNet-50: **not met**: 1.200× (6.00 vs 5.00 GiB")
    assert "  - ResNet-18: not measured (no paired run of this model)" in lines
    assert "| AMP + 2:4 + INT8 QAT, compiled, recompute=False / AMP, compiled | **1.050×** | 1.000–1.200 |" in page
    # a run with fewer than 5 rounds gives no verdict
    short = _paired_run(q=21.0, a=20.0, mem_q=6.0)
    short["models"]["resnet50"]["ratios"]["c_amp_24_qat/c_amp"].update(n=3)
    assert "not measured (3 rounds, fewer than 5)" in make_docs.render("{{targets}}", {"s.json": short})


def test_sections_show_the_newest_full_run_and_targets_fall_back_to_a_named_earlier_run():
    import copy

    def run(date: str, q: float, with_masks: bool) -> dict:
        r = _paired_run(q=q, a=20.0, mem_q=6.0)
        r["environment"]["date"] = date
        rec = r["models"]["resnet50"]
        if with_masks:
            rec["lanes"]["c_amp_24"] = copy.deepcopy(rec["lanes"]["c_amp"])
            rec["ratios"]["c_amp_24/c_amp"] = {**rec["ratios"]["c_amp_24_qat/c_amp"], "median": 1.01, "max": 1.02}
        else:  # a third lane, so that the run counts as a full one
            rec["lanes"]["amp"] = copy.deepcopy(rec["lanes"]["c_amp"])
        return r

    old = run("2026-11-01T00:00:00+00:00", q=21.0, with_masks=True)
    new = run("2026-11-02T00:00:00+00:00", q=25.0, with_masks=False)
    spot = _paired_run(q=30.0, a=20.0, mem_q=6.0)  # two lanes only, newest
    spot["environment"]["date"] = "2026-11-03T00:00:00+00:00"
    spot_rec = spot["models"]["resnet50"]  # the spot check's QAT lane is the recompute=True one
    spot_rec["lanes"]["c_amp_24_qat_rc"] = spot_rec["lanes"].pop("c_amp_24_qat")
    spot_rec["ratios"] = {"c_amp_24_qat_rc/c_amp": spot_rec["ratios"].pop("c_amp_24_qat/c_amp")}
    results = {"a_old.json": old, "b_new.json": new, "c_spot.json": spot}
    assert make_docs.paired_models(results)["resnet50"][0] == "b_new.json"
    page = make_docs.render("{{targets}}\n{{other_paired}}", results)
    lines = page.splitlines()
    qat = lines[lines.index("- **2:4 + INT8 QAT step with recompute=False, compiled vs compiled AMP ≤ 1.10×**") + 1]
    assert "min–max 1.000–1.250" in qat and "earlier run" not in qat  # the new run's, not the spot check's
    masks = lines[lines.index("- **2:4 masks alone, compiled vs compiled AMP ≤ 1.03×**") + 1]
    assert masks.startswith("  - ResNet-50: **met**: median 1.010×")
    assert masks.endswith("(from `a_old.json`, an earlier run)")
    rc_target = "- **2:4 + INT8 QAT step (the default, recompute=True), compiled vs compiled AMP ≤ 1.10×**"
    rc = lines[lines.index(rc_target) + 1]
    assert rc.startswith("  - ResNet-50: **met**: median 1.080×") and rc.endswith("(from `c_spot.json`, a later run)")
    assert "| `c_spot.json` |" in page and "| `a_old.json` |" in page and "| `b_new.json` |" not in page
