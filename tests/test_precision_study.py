"""The precision study harness (studies/precision.py): its grid is laid out as `exatrain launch --sweep` lays out a
sweep, and collection turns finished run directories into the stability table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import REPO

from exatrain.config import parse_config
from exatrain.launch.submit import prepare

spec = importlib.util.spec_from_file_location("precision_study", REPO / "studies" / "precision.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)

FORMATS, LRS, SEEDS = ("fp32", "e8m3", "e4m3"), ("1e-3", "1e-2"), ("0", "1")


def test_grid_is_the_launch_sweep_layout(tmp_path):
    """Local runs go to root/<index> in the order a Slurm job array would run them, so one collector serves both."""
    plan = prepare(parse_config(study.CONFIG, [f"run_dir={tmp_path}"]), study.axes(FORMATS, LRS, SEEDS))
    points = study.points_of(FORMATS, LRS, SEEDS)
    assert [r.point for r in plan.runs] == points and len(points) == 12
    assert [r.run_dir for r in plan.runs] == [tmp_path.absolute() / str(i) for i in range(12)]
    cfg = plan.runs[5].cfg
    assert cfg.model.converters == ["simulated"] and cfg.train.callbacks == ["divergence", "sharpness"]
    assert plan.slurm.world_size == 1


def _fake_run(run_dir: Path, diverged_at: int | None, val: float, phi: float) -> None:
    run_dir.mkdir(parents=True)
    steps = diverged_at or 300
    (run_dir / "divergence.json").write_text(json.dumps({
        "diverged": diverged_at is not None, "step": diverged_at, "reason": "loss spike" if diverged_at else None,
        "steps_done": steps, "status": "stopped" if diverged_at else "completed"}))
    records = [{"kind": "train", "step": s, "loss": 7.0} for s in range(1, steps + 1)]
    records[-1]["sharpness_phi"] = phi
    records.append({"kind": "eval", "step": steps, "val_loss": val})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_collection_counts_divergence_and_the_good_learning_rates(tmp_path):
    points = study.points_of(FORMATS, LRS, SEEDS)
    for i, p in enumerate(points):
        values = dict(x.split("=") for x in p)
        fmt, lr, seed = values[study.FORMAT_KEY], float(values[study.LR_KEY]), int(values[study.SEED_KEY])
        diverged = 40 + seed if fmt == "e4m3" and lr == 1e-2 else None
        val = {"fp32": 6.0, "e8m3": 6.1, "e4m3": 6.5}[fmt] + (0.3 if lr == 1e-2 else 0.0) + 0.01 * seed
        _fake_run(tmp_path / str(i), diverged, val, 0.05 + seed / 100)
    runs = [study.collect_run(tmp_path / str(i), p) for i, p in enumerate(points)]
    summary = study.summarize(runs, FORMATS, LRS)
    cell = summary["cells"]["e4m3@0.01"]
    assert cell["diverged"] == 2 and cell["median_diverged_at"] == 40.5 and cell["val_loss"] is None
    assert summary["cells"]["e8m3@0.001"]["val_loss"] == pytest.approx(6.105)
    assert summary["fp32_best"] == pytest.approx(6.005)
    good = {f: summary["formats"][f]["good_lrs"] for f in FORMATS}
    assert good["fp32"] == {"0.1": [1e-3], "0.25": [1e-3], "0.5": [1e-3, 1e-2]}
    assert good["e8m3"] == {"0.1": [1e-3], "0.25": [1e-3], "0.5": [1e-3, 1e-2]}
    assert good["e4m3"] == {"0.1": [], "0.25": [], "0.5": [1e-3]} and summary["formats"]["e4m3"]["exponent_bits"] == 4
    md = study.markdown({"summary": summary, "formats": FORMATS, "lrs": LRS, "seeds": SEEDS, "runs": runs,
                         "model": "fake", "steps": 300, "total_seconds": 60.0, "jobs": 1})
    assert "| 2/2 @40.5 · – · φ – |" in md and "| fp32 | 8 | 23 | 0.001 | 0.001 | 0.001, 0.01 |" in md
