"""Distillation methods as plug-ins: the registry, spec parsing, golden values, training, checkpoints."""

from __future__ import annotations

import csv
import math
import signal
import subprocess
import typing
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import cli_env, cqkd_cmd
from test_cache import make_teacher_run
from test_regions import make_folder_teacher
from test_scale import make_folder

from cqkd.core.config import RunConfig
from cqkd.core.io import load_tensors
from cqkd.distill.methods import METHODS, Outputs, Progress, Settings, make_method
from cqkd.distill.methods.base import standardize
from cqkd.errors import CqkdError
from cqkd.train import fit as training
from cqkd.train.checkpoints import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _row_config(row: dict[str, str]) -> RunConfig:
    """The RunConfig of one row of a results CSV (the CSV stores every config field as text)."""
    hints = typing.get_type_hints(RunConfig)
    raw: dict[str, typing.Any] = {}
    for f in fields(RunConfig):
        if f.name not in row:
            continue
        text = row[f.name]
        if text == "":
            raw[f.name] = None
        elif hints[f.name] is bool:
            raw[f.name] = text == "True"
        else:
            raw[f.name] = text
    return RunConfig.from_dict(raw)


def test_default_method_keeps_every_study_runs_config_digest():
    """The default method (kd) is not in the digest: every finished run of the committed study
    (docs/results/fashion-mnist-results.csv, 96 rows) keeps the config_digest it was recorded with,
    so a sweep recognises its finished runs."""
    with open(ROOT / "docs/results/fashion-mnist-results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 96
    for row in rows:
        cfg = _row_config(row)
        assert cfg.method == "kd"
        assert cfg.digest() == row["config_digest"], row["run"]
        if cfg.kind == "distill":  # another method is another run
            assert cfg.replace(method="dkd").digest() != row["config_digest"]


# ------------------------------------------------------------------ the registry and the spec


LOGIT_METHODS = [n for n, m in METHODS.items() if m.needs.teacher_logits]


def test_registry_covers_the_issue_methods_and_each_declares_itself():
    assert set(METHODS) == {"kd", "dkd", "dist", "ctkd", "tfkd", "fitnet", "at"}
    for name, cls in METHODS.items():
        assert cls.name == name and cls.paper and cls.summary and cls.__doc__
        make_method(name, Settings())  # every default is in range


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_option_of_every_method_parses_and_is_range_checked(name):
    cls = METHODS[name]
    for key, opt in cls.options.items():
        m = make_method(f"{name},{key}={opt.default}", Settings())
        assert m.opts[key] == opt.default
        if opt.low is not None:
            with pytest.raises(CqkdError, match=rf"--method {name}: {key}="):
                make_method(f"{name},{key}={opt.low - 1}", Settings())
    with pytest.raises(CqkdError, match=rf"--method {name}: unknown key 'nosuch'"):
        make_method(f"{name},nosuch=1", Settings())


@pytest.mark.parametrize("spec, message", [
    ("dkdd", "unknown method 'dkdd'; did you mean 'dkd'"),
    ("dkd,bta=8", "--method dkd: unknown key 'bta' (did you mean 'beta'?)"),
    ("dkd,beta=-1", "--method dkd: beta='-1' must be >= 0"),
    ("dist,tau=0", "--method dist: tau='0' must be > 0"),
    ("kd,standardize=maybe", "--method kd: standardize='maybe' must be true or false"),
    ("tfkd,a=2", "--method tfkd: a='2' must be <= 1"),
    ("dkd,beta", "--method 'dkd,beta': 'beta' must be key=value"),
    ("fitnet,standardize=true", "--method fitnet: unknown key 'standardize'"),
])
def test_bad_method_specs_name_the_culprit(spec, message):
    with pytest.raises(CqkdError) as e:
        make_method(spec, Settings())
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("spec, message", [
    ("nosuch", "unknown method 'nosuch'"),
    ("dkd,gamma=1", "--method dkd: unknown key 'gamma'"),
    ("at,beta=-5", "--method at: beta='-5' must be >= 0"),
])
def test_bad_method_through_the_real_command_is_one_line_exit_2(tmp_path, spec, message):
    out = tmp_path / "run"
    r = subprocess.run(cqkd_cmd("distill", "--dataset", "synthetic", "--teacher", str(tmp_path / "t"), "--method",
                                spec, "--out", str(out), "--quiet"), env=cli_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cqkd: error: {message}"), r.stderr
    assert not out.exists()


def test_method_is_for_distillation_runs_and_a_late_config_field():
    with pytest.raises(CqkdError, match="method='dkd': a distillation method needs a distillation run"):
        RunConfig.from_dict({"kind": "train", "method": "dkd"})
    a = RunConfig.from_dict({"kind": "distill", "teacher": "t"})
    assert a.method == "kd"
    assert a.replace(method="kd").digest() == a.digest() != a.replace(method="dkd").digest()


def test_the_sweep_planner_takes_method_as_a_grid_key_and_validates_it():
    from cqkd.sweep.plan import load_sweep, plan_sweep

    plan = load_sweep(ROOT / "configs/fashion-mnist-methods.yaml", "/tmp/m")
    assert len(plan.runs) == 136
    methods = {r.cfg.method for r in plan.runs if r.group == "distill"}
    assert methods == {"kd", "kd,standardize=true", "dkd", "dist", "ctkd", "tfkd", "fitnet", "at"}
    raw = {"teachers": {"t": {"model": "cnn-small"}}, "distill": {"model": "cnn-small", "method": ["kd", "dkd,bta=1"]}}
    with pytest.raises(CqkdError, match=r"distill .*method=dkd,bta=1.*unknown key 'bta'"):
        plan_sweep(raw, "/tmp/m2")


# ------------------------------------------------------------------ golden values (derived by hand)

def _out(*rows, t_cal=1.0, features=()):
    return Outputs(torch.tensor(rows, dtype=torch.float32), list(features), t_cal)


def test_kd_golden():
    # z_s = (0, 0): p_s = (1/2, 1/2); z_t = (ln 3, 0): p_t = (3/4, 1/4) at T = 1.
    # KL(p_t || p_s) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812; CE(y=0) = ln 2 = 0.693147.
    # alpha = 0.5: loss = 0.5 * 0.693147 + 0.5 * 1 * 0.130812 = 0.411980.
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    m = make_method("kd", Settings(temperature=1.0, alpha=0.5))
    t = m.loss(_out([0.0, 0.0]), _out([math.log(3), 0.0]), torch.tensor([0]), Progress())
    assert float(t["kl"]) == pytest.approx(kl, abs=1e-6) and float(t["ce"]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(t["loss"]) == pytest.approx(0.5 * math.log(2) + 0.5 * kl, abs=1e-6)
    # T_cal = 2 on teacher logits (2 ln 3, 0) gives the same targets: z_t / T_cal is applied first
    t2 = m.loss(_out([0.0, 0.0]), _out([2 * math.log(3), 0.0], t_cal=2.0), torch.tensor([0]), Progress())
    assert float(t2["kl"]) == pytest.approx(kl, abs=1e-6)


def test_standardized_kd_golden_and_blind_to_teacher_calibration():
    # z_s = (1, 2, 3): mean 2, unbiased std 1 -> (-1, 0, 1); z_t = (2, 4, 6): mean 4, std 2 -> (-1, 0, 1).
    # The standardized logits agree: KL = 0, loss = (1 - alpha) * CE(z_s, y=2) with
    # CE = -log softmax(1,2,3)[2] = log(e^-2 + e^-1 + 1) = 0.407606.
    ce = math.log(math.exp(-2) + math.exp(-1) + 1)
    for t_cal in (1.0, 3.0):  # z-scores ignore the teacher's scale: calibration has no effect
        m = make_method("kd,standardize=true", Settings(temperature=4.0, alpha=0.5))
        t = m.loss(_out([1.0, 2.0, 3.0]), _out([2.0, 4.0, 6.0], t_cal=t_cal), torch.tensor([2]), Progress())
        assert float(t["kl"]) == pytest.approx(0.0, abs=1e-6)
        assert float(t["loss"]) == pytest.approx(0.5 * ce, abs=1e-6)
    # plain kd on the same logits does see a difference
    kd = make_method("kd", Settings(temperature=4.0, alpha=0.5))
    assert float(kd.loss(_out([1.0, 2.0, 3.0]), _out([2.0, 4.0, 6.0]), torch.tensor([2]), Progress())["kl"]) > 1e-3
    z = torch.randn(5, 7)
    assert torch.allclose(standardize(3 * z + 1), standardize(z), atol=1e-5)


def test_dkd_golden_and_against_the_mdistiller_formula():
    # z_s = 0 (p_s = 1/3 each), z_t = (0, ln 2, 0): p_t = (1/4, 1/2, 1/4); target y = 0; T = 1.
    # binary: b_t = (1/4, 3/4), b_s = (1/3, 2/3): TCKD = 1/4 ln(3/4) + 3/4 ln(9/8) = 0.016417
    # non-target (classes 1, 2): q_t = (2/3, 1/3), q_s = (1/2, 1/2): NCKD = 2/3 ln(4/3) + 1/3 ln(2/3) = 0.056633
    tckd = 0.25 * math.log(0.75) + 0.75 * math.log(9 / 8)
    nckd = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    ce = math.log(3)
    m = make_method("dkd,T=1,warmup=2", Settings(epochs=6))
    y = torch.tensor([0])
    t = m.loss(_out([0.0, 0.0, 0.0]), _out([0.0, math.log(2), 0.0]), y, Progress(epoch=4.0))
    assert float(t["tckd"]) == pytest.approx(tckd, abs=1e-6) and float(t["nckd"]) == pytest.approx(nckd, abs=1e-6)
    assert float(t["loss"]) == pytest.approx(ce + 1 * tckd + 8 * nckd, abs=1e-5)
    # linear warm-up: at epoch 1 of a 2-epoch warm-up the KD part has weight 1/2
    half = m.loss(_out([0.0, 0.0, 0.0]), _out([0.0, math.log(2), 0.0]), y, Progress(epoch=1.0))
    assert float(half["loss"]) == pytest.approx(ce + 0.5 * (tckd + 8 * nckd), abs=1e-5)
    # T = 2 on doubled logits: the same distributions, each term times T^2 = 4
    m2 = make_method("dkd,T=2,warmup=2", Settings(epochs=6))
    t2 = m2.loss(_out([0.0, 0.0, 0.0]), _out([0.0, 2 * math.log(2), 0.0]), y, Progress(epoch=4.0))
    assert float(t2["tckd"]) == pytest.approx(4 * tckd, abs=1e-5) and float(t2["nckd"]) == pytest.approx(4 * nckd, abs=1e-5)
    # the default warm-up is the paper's 20/240 of the run: 0.5 epochs of 6
    assert make_method("dkd", Settings(epochs=6)).warmup_epochs() == pytest.approx(0.5)
    # mdistiller's DKD formula, written out (read, not imported): p = softmax(z/T),
    # b = (p·gt, p·other) -> tckd = sum(b_t log(b_t / b_s)) T² / N;
    # nckd = KL(softmax(z_t/T - 1000 gt) || softmax(z_s/T - 1000 gt)) summed, T² / N
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    yy = torch.randint(0, 10, (16,), generator=g)
    T = 4.0
    gt = F.one_hot(yy, 10).float()
    p_s, p_t = F.softmax(z_s / T, 1), F.softmax(z_t / T, 1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], 1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], 1)
    ref_tckd = (b_t * (b_t.log() - b_s.log())).sum() * T**2 / 16
    q_t = F.softmax(z_t / T - 1000 * gt, 1)
    ref_nckd = (q_t * (torch.log(q_t + 1e-30) - F.log_softmax(z_s / T - 1000 * gt, 1)) * (1 - gt)).sum() * T**2 / 16
    ours = make_method("dkd,warmup=1", Settings()).loss(Outputs(z_s), Outputs(z_t), yy, Progress(epoch=5.0))
    assert float(ours["tckd"]) == pytest.approx(float(ref_tckd), rel=1e-5)
    assert float(ours["nckd"]) == pytest.approx(float(ref_nckd), rel=1e-5)


def test_dist_golden():
    # p_t = ((3/4, 1/4), (1/4, 3/4)); the student reversed: p_s = ((2/5, 3/5), (3/5, 2/5)) (z_s = (0, ln 1.5), ...).
    # With 2 classes a centred row is (d, -d): each row's Pearson is sign(d_s d_t) = -1, inter = 1 - (-1) = 2;
    # each column over the batch is likewise reversed: intra = 2. CE(y = (0, 1)) = -ln(2/5) = 0.916291.
    # beta = gamma = tau = 1: loss = 0.916291 + 2 + 2.
    m = make_method("dist", Settings())
    z_t = _out([math.log(3), 0.0], [0.0, math.log(3)])
    t = m.loss(_out([0.0, math.log(1.5)], [math.log(1.5), 0.0]), z_t, torch.tensor([0, 1]), Progress())
    assert float(t["inter"]) == pytest.approx(2.0, abs=1e-5) and float(t["intra"]) == pytest.approx(2.0, abs=1e-5)
    assert float(t["loss"]) == pytest.approx(-math.log(0.4) + 4, abs=1e-5)
    # the same order, any sharpness: the relations are perfect, both terms 0 (KL would not be)
    t = m.loss(_out([math.log(1.5), 0.0], [0.0, math.log(1.5)]), z_t, torch.tensor([0, 1]), Progress())
    assert float(t["inter"]) == pytest.approx(0.0, abs=1e-5) and float(t["intra"]) == pytest.approx(0.0, abs=1e-5)


def test_ctkd_golden_and_the_reversed_gradient():
    # theta_0 = 1: T = 1 + 20 sigmoid(1) = 15.621172; lambda ramps by a cosine: 0 at epoch 0,
    # 1/2 at half the ramp, 1 from the end of the ramp (the default ramp: 10/240 of the run's epochs).
    m = make_method("ctkd,ramp=2", Settings(alpha=0.5, epochs=6))
    mods = m.build([], [])
    assert list(mods) == ["temperature"]
    assert m.lam(0.0) == 0 and m.lam(1.0) == pytest.approx(0.5) and m.lam(3.0) == pytest.approx(1.0)
    assert make_method("ctkd", Settings(epochs=24)).lam(1.0) == pytest.approx(1.0)  # ramp 24*10/240 = 1 epoch
    z_s = torch.tensor([[0.0, 1.0, -1.0]])
    z_t = torch.tensor([[2.0, 0.0, 0.0]])
    t = m.loss(Outputs(z_s), Outputs(z_t), torch.tensor([0]), Progress(epoch=1.0))
    T0 = 1 + 20 / (1 + math.exp(-1))
    assert float(t["temperature"]) == pytest.approx(T0, abs=1e-5)
    t["loss"].backward()
    # d loss / d theta of the same loss without the reversal, at lambda = 1/2: the stored grad is -1/2 of it
    theta = torch.ones(1, requires_grad=True)
    temp = 1 + 20 * torch.sigmoid(theta)
    kl = F.kl_div(F.log_softmax(z_s / temp, -1), F.log_softmax(z_t / temp, -1), reduction="batchmean", log_target=True)
    (0.5 * F.cross_entropy(z_s, torch.tensor([0])) + 0.5 * temp.squeeze() ** 2 * kl).backward()
    assert float(m.temperature.theta.grad) == pytest.approx(-0.5 * float(theta.grad), rel=1e-5)
    assert float(theta.grad) != 0


def test_tfkd_golden_needs_no_teacher():
    # K = 2, y = 0, a = 0.99: u = (0.99, 0.01); the authors soften it as softmax(u / T), T = 20:
    # q = (s, 1 - s), s = sigmoid(0.98 / 20). z_s = (0, 0): p_s = (1/2, 1/2).
    # reg = (1/K) KL(q || p_s) (the element mean of nn.KLDivLoss), times m = 100;
    # loss = (1 - 0.1) CE + 0.1 * reg, CE = ln 2.
    s = 1 / (1 + math.exp(-0.98 / 20))
    kl = s * math.log(2 * s) + (1 - s) * math.log(2 * (1 - s))
    m = make_method("tfkd", Settings())
    assert not METHODS["tfkd"].needs.teacher_logits
    t = m.loss(_out([0.0, 0.0]), None, torch.tensor([0]), Progress())
    assert float(t["reg"]) == pytest.approx(100 * kl / 2, rel=1e-4)
    assert float(t["loss"]) == pytest.approx(0.9 * math.log(2) + 0.1 * 100 * kl / 2, rel=1e-5)


def test_fitnet_golden_with_the_spatial_adapter():
    # hint maps: student (1, 1, 2, 2) of ones; teacher (1, 1, 4, 4) whose 2x2 average pools are (1, 2, 3, 4).
    # The regressor set to the identity (1x1 conv weight 1; BN in eval with mean 0, var 1: x / sqrt(1 + 1e-5); ReLU):
    # MSE = ((1-1)² + (1-2)² + (1-3)² + (1-4)²) / 4 = 3.5 (up to the BN epsilon); loss = CE + 100 * 3.5.
    m = make_method("fitnet", Settings())
    mods = m.build([torch.Size([1, 1, 2, 2])], [torch.Size([1, 1, 4, 4])])
    with torch.no_grad():
        mods["regressor"][0].weight.fill_(1.0)
    mods.eval()
    f_t = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1).view(1, 1, 4, 4)
    t = m.loss(Outputs(torch.zeros(1, 2), [torch.ones(1, 1, 2, 2)]), Outputs(torch.zeros(1, 2), [f_t]),
               torch.tensor([0]), Progress())
    hint = float(t["hint"].detach())
    assert hint == pytest.approx(3.5, abs=1e-4)
    assert float(t["loss"].detach()) == pytest.approx(math.log(2) + 100 * hint, abs=1e-4)


def test_at_golden_with_the_spatial_adapter():
    # student map (1, 1, 2, 2) = ((1, 0), (0, 0)): A_s = (1, 0, 0, 0), Q_s = (1, 0, 0, 0).
    # teacher (1, 2, 4, 4) of ones: A_t = 1 everywhere, pooled to 2x2: (1, 1, 1, 1), Q_t = (1/2, 1/2, 1/2, 1/2).
    # mean (Q_s - Q_t)² = (1/4 + 3 * 1/4) / 4 = 0.25; loss = CE + 1000/2 * 0.25 = ln 2 + 125.
    # A teacher lit only in its top-left quadrant pools to Q_t = Q_s: the term is 0.
    m = make_method("at", Settings())
    f_s = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    t = m.loss(Outputs(torch.zeros(1, 2), [f_s]), Outputs(torch.zeros(1, 2), [torch.ones(1, 2, 4, 4)]),
               torch.tensor([0]), Progress())
    assert float(t["at"]) == pytest.approx(0.25, abs=1e-6) and float(t["loss"]) == pytest.approx(math.log(2) + 125, abs=1e-4)
    lit = torch.zeros(1, 2, 4, 4)
    lit[..., :2, :2] = 1
    t = m.loss(Outputs(torch.zeros(1, 2), [f_s]), Outputs(torch.zeros(1, 2), [lit]), torch.tensor([0]), Progress())
    assert float(t["at"]) == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------ in training


def _cfg(teacher: Path, method: str, **kw) -> RunConfig:
    base = dict(kind="distill", dataset="synthetic", train_samples=192, model="cnn-small", size=7, epochs=2,
                batch_size=64, teacher=str(teacher), temperature=4.0, alpha=0.5, seed=3, accelerator="cpu",
                method=method, checkpoint_every_n_steps=0)
    return RunConfig.from_dict({**base, **kw})


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory) -> Path:
    return make_teacher_run(tmp_path_factory.mktemp("mteacher") / "teacher")


@pytest.mark.parametrize("spec", [m if m != "kd" else "kd,standardize=true" for m in LOGIT_METHODS] + ["kd"])
def test_cached_and_online_give_the_same_loss_at_every_step(tmp_path, random_teacher, monkeypatch, spec):
    """Every logit method: a run with the teacher online and one reading the cache, same seed:
    the same loss terms at every step (up to the float16 rounding of the cache)."""
    cls = METHODS[spec.split(",")[0]]
    real = cls.loss
    records: dict[str, list[dict[str, float]]] = {}
    mode = ["off"]

    def recording(self, student, teacher, labels, progress):
        terms = real(self, student, teacher, labels, progress)
        records.setdefault(mode[0], []).append({k: float(v.detach()) for k, v in terms.items()})
        return terms

    monkeypatch.setattr(cls, "loss", recording)
    m_off = training.fit_run(_cfg(random_teacher, spec, teacher_cache="off"), tmp_path / "off", progress=False)
    mode[0] = "auto"
    m_auto = training.fit_run(_cfg(random_teacher, spec), tmp_path / "auto", progress=False)
    assert m_off["teacher_source"] == "online" and m_auto["teacher_source"] == "cache"
    off, auto = records["off"], records["auto"]
    assert len(off) == len(auto) == 2 * 3
    for step, (a, b) in enumerate(zip(off, auto)):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-4), f"step {step}: {k} {a[k]} vs {b[k]}"
    logged = (tmp_path / "auto" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {f"train/{k}" for k in off[0]} <= set(logged)  # every term is logged per epoch


def test_topk_is_refused_for_methods_that_need_the_whole_distribution(tmp_path, random_teacher):
    for spec in ("dkd", "dist"):
        with pytest.raises(CqkdError, match=rf"--method {spec} needs every class's teacher probability"):
            training.fit_run(_cfg(random_teacher, spec, teacher_topk=3), tmp_path / spec, progress=False)
        assert not (tmp_path / spec).exists()
    training.prepare(_cfg(random_teacher, "dkd", teacher_topk=10))  # k = C is exact: accepted


@pytest.mark.parametrize("spec, key", [("ctkd", "distiller.temperature.theta"),
                                       ("fitnet", "distiller.regressor.0.weight")])
def test_method_parameters_train_are_checkpointed_resumed_and_never_exported(tmp_path, random_teacher, spec, key):
    """A method's own parameters change in training, are in the checkpoint, are restored by
    --resume (a run killed after epoch 1 and resumed ends where the uninterrupted run ends)
    and are not in the student's weights."""
    cfg = _cfg(random_teacher, spec)
    whole = tmp_path / "whole"
    training.fit_run(cfg, whole, progress=False)
    last = load_checkpoint(whole / "checkpoints" / "last.ckpt")["state_dict"]
    assert key in last and not any(k.startswith("teacher.") for k in last)
    init = make_method(spec, Settings()).build(
        [torch.Size([2, 64, 3, 3])], [torch.Size([2, 64, 14, 14])]) if spec == "fitnet" else None
    if spec == "ctkd":
        assert not torch.equal(last[key], torch.ones(1))  # trained away from theta_0 = 1
    else:
        assert last[key].shape == init["regressor"][0].weight.shape
        assert last["distiller.regressor.1.num_batches_tracked"] == 6  # the regressor was trained 6 steps
    weights = load_tensors(whole / "model.safetensors")
    assert weights and not any(k.startswith(("distiller", "teacher")) for k in weights)
    # killed after epoch 1, then resumed
    cut = tmp_path / "cut"
    args = ["distill", "--dataset", "synthetic", "--train-samples", "192", "--model", "cnn-small", "--size", "7",
            "--epochs", "2", "--batch-size", "64", "--teacher", str(random_teacher), "--seed", "3",
            "--accelerator", "cpu", "--method", spec, "--checkpoint-every-n-steps", "0", "--quiet", "--out", str(cut)]
    env = {**cli_env(), "CQKD_TEST_KILL_AFTER_EPOCH": "1"}
    r = subprocess.run(cqkd_cmd(*args), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr
    mid = load_checkpoint(cut / "checkpoints" / "last.ckpt")["state_dict"]
    assert not torch.equal(mid[key], last[key])  # half-way
    r = subprocess.run(cqkd_cmd("distill", "--out", str(cut), "--resume", "--quiet"), env=cli_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    resumed = load_checkpoint(cut / "checkpoints" / "last.ckpt")["state_dict"]
    torch.testing.assert_close(resumed[key], last[key])


@pytest.mark.parametrize("spec", ["tfkd", "fitnet", "at"])
def test_methods_without_teacher_logits_run_and_say_where_the_teacher_came_from(tmp_path, random_teacher, spec):
    m = training.fit_run(_cfg(random_teacher, spec, epochs=1), tmp_path / spec, progress=False)
    assert 0 <= m["top1"] <= 1
    if spec == "tfkd":
        assert m["teacher_source"] == "none"
    else:
        assert m["teacher_source"] == "online" and "needs the teacher's features" in m["teacher_source_reason"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("mimgs"), classes=3, per_class=6, val_per_class=2, size=40)


def _resnet_folder_teacher(path: Path, crop: int = 32) -> Path:
    """A torchvision resnet18 teacher run for 3-class image folders (random weights)."""
    from safetensors.torch import save_file

    from cqkd.core.rundir import RunDir
    from cqkd.nets.registry import build_model

    cfg = RunConfig.from_dict({"kind": "train", "dataset": "imagefolder", "model": "resnet18", "size": crop,
                               "crop_size": crop, "epochs": 1})
    run = RunDir(path)
    run.prepare(cfg, force=True)
    torch.manual_seed(0)
    net = build_model("resnet18", 3, 3, crop)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(run.weights_file))
    run.metrics_file.write_text("{}")
    run.set_state("finished")
    return path


@pytest.mark.parametrize("spec, model", [("at", "cnn-small"), ("fitnet", "cnn-small"), ("at", "resnet18"),
                                         ("fitnet", "resnet18")])
def test_feature_methods_on_an_image_folder(tmp_path, image_folder, spec, model):
    """A 32 px teacher and an 8 px (cnn) or 16 px (resnet) student on an image folder: the stage maps
    differ in size and the adapter pools the larger; the run finishes."""
    if model == "resnet18":
        teacher, size = _resnet_folder_teacher(tmp_path / "teacher"), 16
    else:
        teacher, size = make_folder_teacher(tmp_path / "teacher"), 8
    cfg = RunConfig.from_dict(dict(kind="distill", dataset="imagefolder", data_dir=str(image_folder), crop_size=32,
                                   size=size, val_size=3, model=model, epochs=1, batch_size=5, teacher=str(teacher),
                                   seed=0, accelerator="cpu", method=spec))
    m = training.fit_run(cfg, tmp_path / "student", progress=False)
    assert 0 <= m["top1"] <= 1 and m["teacher_source"] == "online"
    header = (tmp_path / "student" / "metrics.csv").read_text().splitlines()[0]
    assert ("train/at" if spec == "at" else "train/hint") in header
