"""Sweeps and their report, on the synthetic dataset with tiny settings (no Fashion-MNIST)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from cqkd.analysis.findings import findings
from cqkd.analysis.report import write_report
from cqkd.cli import main
from cqkd.core.io import read_json
from cqkd.core.rundir import RunDir
from cqkd.errors import CqkdError
from cqkd.sweep.plan import load_sweep, plan_sweep
from cqkd.sweep.runner import run_sweep

TINY = {"dataset": "synthetic", "train_samples": 200, "epochs": 1, "accelerator": "cpu"}
SPEC = {
    "base": TINY,
    "budget_minutes": 10,
    "teachers": {"t28": {"model": "cnn-small", "size": 28}},
    "supervised": {"model": "cnn-small", "size": 7, "seed": 0},
    "distill": [{"teacher": "t28", "model": "cnn-small", "size": 7, "temperature": [1, 4], "seed": [0, 1]},
                {"size": 7, "temperature": 4, "teacher_calibration": "temperature"},  # T_cal fitted on val
                {"size": 7, "temperature": "calibrated"}],
}
N_RUNS = 8
CAL = ["distill/teacher=t28,model=cnn-small,size=7,T=4,tcal=temperature,alpha=0.5,seed=0",
       "distill/teacher=t28,model=cnn-small,size=7,T=calibrated,tcal=none,alpha=0.5,seed=0"]


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    cfg = _write(root / "sweep.yaml", SPEC)
    out = root / "out"
    assert main(["sweep", str(cfg), "--out", str(out), "--quiet"]) == 0
    return cfg, out


def test_plan_names_order_and_teachers_first(tmp_path):
    plan = plan_sweep(SPEC, tmp_path / "o")
    names = [r.name for r in plan.runs]
    assert names[0] == "teachers/t28"
    assert names[1] == "supervised/model=cnn-small,size=7,seed=0"
    # seed is the outer loop over all grids of a section, so seed 0 is complete first
    grid1 = [f"distill/teacher=t28,model=cnn-small,size=7,T={t},tcal=none,alpha=0.5,seed={s}"
             for s in (0, 1) for t in (1, 4)]
    assert names[2:] == grid1[:2] + CAL + grid1[2:]
    assert plan.runs[2].cfg.teacher == str(tmp_path / "o" / "teachers" / "t28")
    # a key given in a grid beyond the fixed ones appears in the name; unsafe characters are replaced
    plan = plan_sweep({**SPEC, "distill": {**SPEC["distill"][0], "lr": [0.01], "augment": "flip,translate=1"}}, tmp_path)
    assert plan.runs[-1].name.endswith("augment=flip_translate_1,lr=0.01,seed=1")


def test_sweep_completes_then_skips(sweep):
    cfg, out = sweep
    state = read_json(out / "sweep.json")
    assert len(state["runs"]) == N_RUNS
    assert {e["state"] for e in state["runs"].values()} == {"finished"}
    tcal = RunDir(out / CAL[0]).metrics()
    assert tcal["teacher_calibration"] == "temperature" and tcal["t_cal"] > 0
    assert tcal["teacher_temperature_applied"] == pytest.approx(tcal["t_cal"])
    calibrated = RunDir(out / CAL[1]).metrics()
    assert calibrated["temperature_mode"] == "calibrated"
    assert calibrated["temperature"] == pytest.approx(tcal["t_cal"])
    assert state["total_wall_s"] > 0 and state["budget_minutes"] == 10
    for name in state["runs"]:
        assert RunDir(out / name).is_finished
    again = run_sweep(load_sweep(cfg, out), progress=False, print_fn=lambda s: None)
    assert again.ran == [] and again.failed == {} and len(again.skipped) == N_RUNS
    assert len(read_json(out / "sweep.json")["invocations"]) == 2


def test_deleted_run_is_rerun_alone(sweep):
    cfg, out = sweep
    victim = "distill/teacher=t28,model=cnn-small,size=7,T=4,tcal=none,alpha=0.5,seed=1"
    shutil.rmtree(out / victim)
    result = run_sweep(load_sweep(cfg, out), progress=False, print_fn=lambda s: None)
    assert result.ran == [victim] and result.ok


def test_dry_run_sees_stale_configs_and_teachers(sweep, tmp_path, capsys):
    cfg, out = sweep
    assert main(["sweep", str(cfg), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"{N_RUNS} runs: {N_RUNS} done, 0 to run" in text and "[done] teachers/t28" in text
    # a changed value changes the digest: every student would rerun, the teacher would not
    changed = _write(tmp_path / "changed.yaml", {**SPEC, "distill": [{**g, "alpha": 0.7} for g in SPEC["distill"]]})
    res = run_sweep(load_sweep(changed, out), dry_run=True, print_fn=lambda s: None)
    assert sorted(res.skipped) == ["supervised/model=cnn-small,size=7,seed=0", "teachers/t28"]
    # the same settings through another spelling of --out are still done
    res = run_sweep(load_sweep(cfg, str(out) + "/./"), dry_run=True, print_fn=lambda s: None)
    assert len(res.skipped) == N_RUNS


def test_failed_points_are_recorded_and_the_rest_finish(sweep, tmp_path, capsys):
    _, out = sweep
    spec = {"base": TINY,
            "teachers": {"old": {"path": str(out / "teachers" / "t28")}},
            "supervised": {"size": 64},  # larger than the 28 px images
            "distill": {"model": ["cnn-small", "no-such-net"], "size": 7, "temperature": 2}}
    cfg = _write(tmp_path / "fail.yaml", spec)
    out2 = tmp_path / "out2"
    assert main(["sweep", str(cfg), "--out", str(out2), "--quiet"]) == 1
    state = read_json(out2 / "sweep.json")["runs"]
    assert state["supervised/model=cnn-small,size=64,seed=0"]["state"] == "failed"
    assert "larger than" in state["supervised/model=cnn-small,size=64,seed=0"]["error"]
    bad = "distill/teacher=old,model=no-such-net,size=7,T=2,tcal=none,alpha=0.5,seed=0"
    assert state[bad]["state"] == "failed" and "no-such-net" in state[bad]["error"]
    good = "distill/teacher=old,model=cnn-small,size=7,T=2,tcal=none,alpha=0.5,seed=0"
    assert state[good]["state"] == "finished" and RunDir(out2 / good).is_finished
    assert state["teachers/old"]["state"] == "external"
    assert "2 failed" in capsys.readouterr().out
    paths = write_report(out2)  # a report with failures and an external teacher
    assert "## Failed runs" in paths["report"].read_text()


def test_students_of_a_failed_teacher_are_skipped(tmp_path):
    spec = {"base": TINY, "teachers": {"bad": {"model": "no-such-net"}},
            "distill": {"size": 7, "temperature": [1, 2]}}
    plan = plan_sweep(spec, tmp_path / "o")
    result = run_sweep(plan, progress=False, print_fn=lambda s: None)
    assert set(result.failed) == {r.name for r in plan.runs}
    students = [n for n in result.failed if n.startswith("distill/")]
    assert len(students) == 2 and all("teacher 'bad' failed" in result.failed[n] for n in students)
    assert not (tmp_path / "o" / students[0]).exists()  # never started


def test_report_files_and_csv(sweep):
    _, out = sweep
    assert main(["report", str(out)]) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == N_RUNS
    for col in ("run", "role", "state", "size", "temperature", "teacher_calibration", "alpha", "seed", "model",
                "top1", "ece", "entropy", "best_val_top1", "flops", "temperature_used", "teacher_metrics.top1",
                "teacher_lr_metrics.ece", "config_digest"):
        assert col in rows[0], col
    assert sorted(r["role"] for r in rows) == ["distill"] * 6 + ["supervised", "teachers"]
    assert {r["temperature_used"] for r in rows if r["role"] == "distill" and r["temperature"] != "calibrated"} \
        == {"1.0", "4.0"}
    assert all(float(r["t_cal"]) > 0 for r in rows if r["run"] in CAL)
    text = (out / "report.md").read_text()
    for needle in ("## Findings", "Verdict rule", "FLOPs/image", "budget: 10 min", "figures/temperature.png",
                   "best by val"):
        assert needle in text, needle
    assert "calibrated − uncalibrated teacher" in text  # finding 3 measured (one seed: inconclusive)
    for fig in ("temperature", "size", "entropy", "calibration"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000


@pytest.mark.parametrize("change, needle", [
    ({"teachrs": {}}, "unknown key 'teachrs' (did you mean 'teachers'?)"),
    ({"base": {**TINY, "epoch": 1}}, "base: unknown key 'epoch'"),
    ({"distill": {"temprature": [1, 2]}}, "distill: unknown key 'temprature'"),
    ({"distill": [{"size": 7}, {"sise": 7}]}, "distill[1]: unknown key 'sise'"),
    ({"distill": {"alpha": [0.5, 2]}}, "alpha=2.0"),
    ({"distill": {"teacher": "nobody"}}, "teacher='nobody'"),
    ({"supervised": {"size": []}}, "size is an empty list"),
    ({"base": {**TINY, "kind": "distill"}}, "'kind' is set by the sweep"),
])
def test_bad_yaml_exits_2_naming_the_key(tmp_path, capsys, change, needle):
    cfg = _write(tmp_path / "bad.yaml", {**SPEC, **change})
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cqkd: error: ") and needle in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_study_config_plans_the_paper_design():
    """The matched design: one training set for teacher and students, one view bank for every
    student, at least 5 seeds per setting, an alpha = 0 control."""
    root = Path(__file__).parent.parent / "configs"
    plan = load_sweep(root / "fashion-mnist-study.yaml", "runs/study")
    groups = [r.group for r in plan.runs]
    assert groups.count("teachers") == 1 and groups.count("supervised") == 3 * 5
    assert groups.count("distill") == 5 * (1 + 6 + 3) + 2 * 5 * 3  # 7 px: control, 6 T, 3 calibrated; 14/4 px: 3 T
    assert {r.cfg.teacher_calibration for r in plan.runs if r.group == "distill"} == {"none", "temperature"}
    assert {r.cfg.train_samples for r in plan.runs} == {20000}
    students = [r for r in plan.runs if r.group != "teachers"]
    assert {r.cfg.views_per_image for r in students} == {8}
    assert sum(r.cfg.alpha == 0 for r in students if r.group == "distill") == 5
    assert all(r.cfg.dataset == "fashion-mnist" for r in plan.runs)
    cond = load_sweep(root / "fashion-mnist-conditions.yaml", "runs/conditions")
    for r in cond.runs:  # every student trains on its teacher's images
        if r.group == "distill":
            assert r.cfg.train_samples == cond.runs[[t.name for t in cond.runs].index(f"teachers/{r.teacher}")].cfg.train_samples
    assert {r.cfg.seed for r in cond.runs if r.group != "teachers"} == set(range(5))


# ------------------------------------------------------------------------------ statistics

N_TEST = 2000


def _row(tmp_path, role, size, seed, top1, val, **kw):
    """A finished run's report row, with test logits whose top-1 accuracy is exactly ``top1``: the
    first round(top1 * N) of a fixed order of the test images are right, the others wrong."""
    from cqkd.core.io import save_tensors

    base = {"run": f"{role}/{size}/{seed}/{kw}", "role": role, "state": "finished", "size": size, "seed": seed,
            "model": "cnn-small", "top1": top1, "best_val_top1": val, "teacher_calibration": "none",
            "temperature": 4.0, "alpha": 0.5, "teacher": "t", "ece": 0.1, "entropy": 0.5}
    base.update(kw)
    labels = torch.arange(N_TEST) % 10
    order = torch.randperm(N_TEST, generator=torch.Generator().manual_seed(100 + seed + 1000 * (role == "distill")))
    pred = (labels + 1) % 10
    right = order[:round(top1 * N_TEST)]
    pred[right] = labels[right]
    path = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    path.mkdir()
    save_tensors(path / "test_logits.pt", {"logits": 4.0 * torch.nn.functional.one_hot(pred, 10).float(),
                                           "labels": labels})
    base["path"] = str(path)
    return base


def test_findings_choose_by_val_and_pair_by_seed(tmp_path):
    rows = []
    for seed in range(3):
        rows.append(_row(tmp_path, "supervised", 7, seed, 0.70 + 0.01 * seed, 0.7))
        for t in (1.0, 4.0, 16.0):
            # T=16 is best on val but T=4 is best on test: the finding must use T=16
            top1 = {1.0: 0.70, 4.0: 0.80, 16.0: 0.75}[t] + 0.01 * seed
            val = {1.0: 0.70, 4.0: 0.72, 16.0: 0.74}[t]
            ent = {1.0: 0.2, 4.0: 0.4, 16.0: 0.8}[t] + 0.01 * seed
            ece = {1.0: 0.10, 4.0: 0.05, 16.0: 0.02}[t]
            rows.append(_row(tmp_path, "distill", 7, seed, top1, val, temperature=t, temperature_used=t,
                             entropy=ent, ece=ece))
            rows.append(_row(tmp_path, "distill", 7, seed, top1 + 0.01 * (seed + 2), val - 0.1, temperature=t,
                             temperature_used=t, teacher_calibration="temperature", ece=ece - 0.01))
    found = findings(rows)
    f1 = [f for f in found if f["finding"] == 1 and "best by val" in f["what"]]
    assert len(f1) == 1 and "T=16" in f1[0]["what"] and "tcal=none" in f1[0]["what"]
    assert f1[0]["estimate"] == pytest.approx(0.05) and f1[0]["n"] == 3 and f1[0]["verdict"] == "holds"
    lo, hi = f1[0]["ci"]
    assert 0 < lo < 0.05 < hi
    per_t = {f["what"]: f["estimate"] for f in found if f["finding"] == 1 and "best by val" not in f["what"]}
    assert per_t["top-1 CQKD at T=4 (tcal=none) − supervised"] == pytest.approx(0.10)
    assert per_t["top-1 CQKD at T=1 (tcal=none) − supervised"] == pytest.approx(0.0)
    f2 = {f["what"]: f for f in found if f["finding"] == 2}
    assert f2["ρ(T, entropy)"]["estimate"] > 0.9 and f2["ρ(T, entropy)"]["verdict"] == "holds"
    assert f2["r(entropy, ECE)"]["estimate"] < -0.9 and f2["r(entropy, ECE)"]["verdict"] == "holds"
    assert f2["ρ(T, top-1)"]["verdict"] != "holds"  # 0.70, 0.80, 0.75: not monotone
    f3 = {f["what"]: f for f in found if f["finding"] == 3}
    top = f3["top-1 calibrated − uncalibrated teacher at T=4"]
    assert top["estimate"] == pytest.approx(0.03) and top["verdict"] == "holds"
    from cqkd.analysis.findings import calibration_pairs, distill_series

    pairs = calibration_pairs(distill_series(rows)[0])
    assert [p["T"] for p in pairs] == ["1", "4", "16"] and all(p["n"] == 3 for p in pairs)
    assert pairs[0]["top1_diff"][:2] == (pytest.approx(0.03), pytest.approx(0.01))


def test_no_effect_is_inconclusive_with_a_detectable_size(tmp_path):
    rows = []
    for seed in range(5):
        rows.append(_row(tmp_path, "supervised", 7, seed, 0.75, 0.7))
        rows.append(_row(tmp_path, "distill", 7, seed, 0.75, 0.7, temperature=4.0, temperature_used=4.0))
    f1 = [f for f in findings(rows) if f["finding"] == 1][0]
    assert f1["estimate"] == 0 and f1["verdict"] == "inconclusive" and f1["mde"] > 0


def test_plan_errors_name_teacher_path(tmp_path):
    with pytest.raises(CqkdError, match="teachers.x: path="):
        plan_sweep({"teachers": {"x": {"path": str(tmp_path / "none")}}}, tmp_path)
    with pytest.raises(CqkdError, match="takes no other keys"):
        plan_sweep({"teachers": {"x": {"path": "a", "model": "cnn-small"}}}, tmp_path)


def test_demo_is_the_demo_yaml_sweep(tmp_path):
    from cqkd.sweep.demo import demo_spec

    from_code = plan_sweep(demo_spec(), tmp_path / "demo")
    from_file = load_sweep(Path(__file__).parent.parent / "configs" / "demo.yaml", tmp_path / "demo")
    assert [(r.name, r.cfg.digest()) for r in from_code.runs] == [(r.name, r.cfg.digest()) for r in from_file.runs]
    assert len(from_code.runs) == 5


def test_another_plan_is_refused_while_workers_run(tmp_path):
    from cqkd.sweep.claims import HeldFile, identity
    from cqkd.sweep.state import SweepDir, join

    spec = {"base": TINY, "teachers": {"bad": {"model": "no-such-net"}}}
    plan = plan_sweep(spec, tmp_path / "o")
    other = plan_sweep({**spec, "teachers": {"bad": {"model": "no-such-net", "seed": 1}}}, tmp_path / "o")
    sd = SweepDir(plan.out)
    with sd.locked() as state:  # a live worker of `other`
        me = identity()
        worker = HeldFile.create(sd.worker_file(me), **me, invocation=join(state, sd, other, False, 60))
    quiet = {"progress": False, "print_fn": lambda s: None}
    with pytest.raises(CqkdError, match="another sweep .* different plan"):
        run_sweep(plan, **quiet)
    with pytest.raises(CqkdError, match="--force"):
        run_sweep(other, force=True, **quiet)
    assert not run_sweep(other, **quiet).ok  # the same plan joins the live worker's sweep
    assert len(read_json(plan.out / "sweep.json")["invocations"]) == 1
    worker.release()
    assert not run_sweep(plan, **quiet).ok  # once no worker is alive, another plan may start
    assert len(read_json(plan.out / "sweep.json")["invocations"]) == 2


def test_unfinished_runs_continue_from_their_checkpoint(sweep, tmp_path):
    from cqkd.sweep.runner import how_to_start

    _, out = sweep
    name = "supervised/model=cnn-small,size=7,seed=0"
    run = RunDir(out / name)
    cfg = run.config()
    assert how_to_start(RunDir(tmp_path / "new"), cfg, force=False) == {}
    assert how_to_start(run, cfg, force=False) == {"force": True}  # finished: start over
    copy = RunDir(tmp_path / "copy")
    shutil.copytree(run.path, copy.path)
    copy.metrics_file.unlink()
    copy.set_state("failed", error="interrupted")
    how = how_to_start(copy, cfg, force=False)
    assert how["resume"] is True and "resuming from" in how["note"]
    assert how_to_start(copy, cfg.replace(lr=0.5), force=False) == {"force": True}  # changed config
    assert how_to_start(copy, cfg, force=True) == {"force": True}
