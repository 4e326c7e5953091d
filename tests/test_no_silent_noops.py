"""Issue 13, items 1-11: what a user does not see. Every silent no-op either works, warns or raises."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch

import atax_kernels
from atax_kernels import ProjectedOptimizer, Subspace
from conftest import backends_under_test

BACKENDS = backends_under_test()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- item 11: empty gradient lists, non-finite combine_ coefficients, ProjectionStats.reason, _ext ---------

@pytest.mark.parametrize("empty_refs", [[], [[]], [[], []], "subspace"])
def test_project_empty_grads_is_noop_whatever_empty_refs(empty_refs):
    refs = Subspace([], max_rank=2) if empty_refs == "subspace" else empty_refs
    stats = atax_kernels.project_([], refs)
    assert not bool(stats.projected) and not bool(stats.skipped) and stats.reason is None
    assert stats.dots.numel() == (0 if empty_refs in ([], "subspace") else len(empty_refs))


def test_project_empty_refs_still_refused_with_gradients():
    with pytest.raises(ValueError, match="refs is empty"):
        atax_kernels.project_([torch.ones(3)], [])
    with pytest.raises(ValueError, match="empty Subspace"):
        atax_kernels.project_([torch.ones(3)], Subspace([torch.ones(3)], max_rank=2))
    with pytest.raises(ValueError, match="unknown mode"):  # bad settings are refused even with nothing to do
        atax_kernels.project_([], [], mode="bogus")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_combine_refuses_nonfinite_coefficient(backend, bad, per_tensor, device):
    target = [torch.randn(5, device=device), torch.randn(3, device=device)]
    vecs = [[torch.randn(5, device=device), torch.randn(3, device=device)] for _ in range(2)]
    coefs = torch.tensor([[0.5, bad], [0.1, 0.2]] if per_tensor else [0.5, bad], dtype=torch.float64, device=device)
    before = [t.clone() for t in target]
    with pytest.raises(ValueError, match=r"coefs has non-finite values .* at \[" + (r"\(0, 1\)" if per_tensor else "1")):
        atax_kernels.combine_(target, vecs, coefs, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(before, target)), "a refused combine_ wrote something"


def test_projection_stats_repr_and_doc_show_reason():
    g, r = [torch.tensor([1.0, float("nan")])], [torch.tensor([1.0, 0.0])]
    stats = atax_kernels.project_(g, r, backend="torch")
    assert "reason='non-finite values" in repr(stats)
    ok = atax_kernels.project_([torch.tensor([1.0, 1.0])], [torch.tensor([1.0, 0.0])], backend="torch")
    assert "reason=None" in repr(ok)
    assert "reason" in atax_kernels.ProjectionStats.__doc__


def test_ext_marker_read_closes_its_file():
    # A fresh interpreter, so the BUILT marker is read (not the in-process cache); unclosed handles become
    # errors printed to stderr ("Exception ignored ... ResourceWarning").
    code = "import gc; from atax_kernels import _ext; _ext.load(); gc.collect()"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-X", "dev", "-W", "error::ResourceWarning", "-c", code],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ResourceWarning" not in out.stderr, out.stderr[-2000:]


# --- item 10: bench warmup and a floor measured like the kernels ---------------------------------------------

def test_bench_quick_warms_up_and_reports_floor_spread(tmp_path, capsys):
    import json

    from atax_kernels.bench import cli, impls

    js = tmp_path / "r.json"
    rc = cli.main(["--quick", "--scale", "0.002", "--dtype", "fp32", "--k", "2", "--repeat", "2",
                    "--backends", "torch", "--no-memory", "--no-progress", "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "warmup 1" in out
    records = json.loads(js.read_text())["records"]
    floor = next(r for r in records if r["impl"] == impls.FLOOR)
    n_impls = len(records) - 1
    # Probed before every implementation in every round plus once per round: interleaved, repeatedly.
    assert floor["floor_probes"] == 2 * (n_impls + 1) == len(floor["probe_times_ms"])
    # Same size: the probe moves the case's minimum traffic (3 fp32 streams per element on CPU).
    assert abs(3 * 4 * floor["probe_numel"] - floor["min_traffic_bytes"]) < 12
    lo, hi = floor["floor_bandwidth_gbps_range"]
    assert lo <= floor["floor_bandwidth_gbps"] <= hi
    assert f"range {lo:.1f}-{hi:.1f} over {floor['floor_probes']} probes" in out


def test_bench_refuses_zero_warmup():
    from atax_kernels.bench import cli, impls

    with pytest.raises(SystemExit, match="--warmup >= 1"):
        cli.main(["--scale", "0.002", "--warmup", "0", "--no-memory", "--no-progress"])


# --- item 9: measure_alignment_tax ---------------------------------------------------------------------------

def test_tax_no_percentage_for_nonpositive_base():
    rng = torch.Generator().manual_seed(0)
    base = (-1.0 - torch.rand(200, generator=rng, dtype=torch.float64)).tolist()  # log-likelihood-like scores
    aligned = [x - 0.01 for x in base]
    r = atax_kernels.measure_alignment_tax("b", "a", {"b": base, "a": aligned}.__getitem__)
    assert r.base_score < 0 and "% of base" not in str(r)
    r0 = atax_kernels.measure_alignment_tax("b", "a", {"b": [0.0] * 40, "a": [-1.0] * 40}.__getitem__)
    assert "% of base" not in str(r0)
    pos = atax_kernels.measure_alignment_tax("b", "a", {"b": [1.0] * 40, "a": [0.5] * 40}.__getitem__)
    assert "+50.0% of base" in str(pos)


def test_tax_warns_on_tiny_samples():
    src = {"b": [1.0, 1.0, 1.0, 1.0], "a": [0.0, 0.0, 0.0, 0.0]}
    with pytest.warns(UserWarning, match=r"only n=4 examples"):
        r = atax_kernels.measure_alignment_tax("b", "a", src.__getitem__)
    assert "unreliable" in str(r)
    big = {"b": [1.0, 0.0] * 15, "a": [0.0, 1.0] * 15}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = atax_kernels.measure_alignment_tax("b", "a", big.__getitem__)  # n = 30: no warning
    assert "unreliable" not in str(r)


# --- item 8: pareto plot ---------------------------------------------------------------------------------------

def test_pareto_plot_alpha_order_labels_fitted_axes_and_base(tmp_path):
    from atax_kernels.pareto import plot_pareto

    # A path that doubles back: sorted by (safety, capability) it would be a different, monotone curve.
    rows = [{"method": "m", "alpha": a, "safety": s, "capability": c}
            for a, s, c in [(1.0, 3.0, -7.5), (0.0, 2.0, -2.0), (0.5, 4.0, -3.0)]]
    path = tmp_path / "p.png"
    drawn = plot_pareto(rows, str(path), y_label="log-likelihood (held-out)")
    assert [p[0] for p in drawn["series"]["m"]] == [0.0, 0.5, 1.0]
    assert drawn["base"] == (2.0, -2.0)
    (x0, x1), (y0, y1) = drawn["xlim"], drawn["ylim"]
    assert x0 < 2.0 and x1 > 4.0 and y0 < -7.5 and y1 > -2.0  # the data sit inside, with a margin
    assert x1 - x0 < 3.0 and y1 - y0 < 8.0  # and the axes fit them (not a fixed or huge range)
    assert drawn["ylabel"] == "log-likelihood (held-out)" and drawn["xlabel"] == "safety"
    assert path.stat().st_size > 1000


def test_pareto_sweep_labels_and_base_star_without_alpha_zero(tmp_path):
    torch.manual_seed(0)
    base, tuned = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    def evaluate(model):
        d = sum(float((p.detach() - base_state[n]).norm()) for n, p in model.named_parameters())
        return {"capability": 10.0 - d, "safety": 5.0 + d}

    import atax_kernels.pareto as P

    seen = {}
    orig = P.plot_pareto

    def spy(*a, **kw):
        seen.update(orig(*a, **kw))
        return seen

    P.plot_pareto = spy
    try:
        rows = P.pareto_sweep({"t": tuned}, base_state, evaluate, alphas=(1.0, 0.5), plot=str(tmp_path / "q.png"),
                              capability_label="accuracy")
    finally:
        P.plot_pareto = orig
    assert [r["alpha"] for r in rows] == [1.0, 0.5]
    assert seen["base"] == (5.0, 10.0) and seen["ylabel"] == "accuracy"
    assert [p[0] for p in seen["series"]["t"]] == [0.5, 1.0]


# --- items 1, 2, 3, 7: ProjectedOptimizer ------------------------------------------------------------------

def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def _losses(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    xc, xs, yc, ys = (torch.randn(8, d, generator=gen) for d in (4, 4, 2, 2))
    return (lambda: ((model(xc) - yc) ** 2).mean()), (lambda: ((model(xs) + ys) ** 2).mean())


def test_step_without_references_says_so_and_warns_once():
    model = _model()
    cap, saf = _losses(model)
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    cap().backward()
    opt.capture_reference()
    opt.zero_grad()  # captured before zero_grad(): the capture is gone
    saf().backward()
    with pytest.warns(UserWarning, match="no references to project against"):
        opt.step()
    assert opt.last_stats.reason == "no references" and not bool(opt.last_stats.projected)
    assert "no references" in opt.last_stats.as_dict()["reason"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per optimizer
        opt.zero_grad()
        saf().backward()
        opt.step()
    assert opt.last_stats.reason == "no references"
    other = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    saf().backward()
    with pytest.warns(UserWarning, match="no references"):  # a new optimizer warns again
        other.step()
    # With a reference the reason is None again.
    opt.zero_grad()
    cap().backward()
    opt.capture_reference()
    saf().backward()
    opt.step()
    assert opt.last_stats.reason is None and bool(opt.last_stats.projected)


def test_step_with_an_activation_subspace_is_not_without_references():
    from atax_kernels.activation import ActivationSubspace

    model = _model()
    cap, saf = _losses(model)
    sub = ActivationSubspace(model, energy=0.9)
    with sub.observe():
        cap()
    sub.update()
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), activation_subspace=sub)
    saf().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no references" warning
        opt.step()
    assert opt.last_stats.reason is None


def test_no_references_warning_points_at_the_callers_line():
    model = _model()
    _, saf = _losses(model)
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    saf().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert [w.filename for w in caught] == [__file__]


def test_safety_backward_before_capture_is_an_error():
    model = _model()
    cap, saf = _losses(model)
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    saf().backward()
    cap().backward()
    opt.capture_reference()  # takes every .grad (safety + capability)
    with pytest.raises(RuntimeError, match="safety backward must come after capture_reference"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_ema_nonfinite_capture_is_reported_like_live():
    results = {}
    for reference in ("live", "ema"):
        model = _model()
        cap, saf = _losses(model)
        opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reference=reference)
        opt.zero_grad()
        cap().backward()
        opt.capture_reference()
        saf().backward()
        opt.step()  # a healthy first step (the EMA has a slot)
        ema_before = [t.clone() for t in opt._ema[0]] if reference == "ema" else None
        opt.zero_grad()
        cap().backward()
        next(model.parameters()).grad[0, 0] = float("nan")
        opt.capture_reference()
        saf().backward()
        g = [p.grad.clone() for p in model.parameters()]
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        applied = [(b - p.detach()) / 0.1 for b, p in zip(before, model.parameters())]
        assert all(torch.allclose(a, x, rtol=1e-5, atol=1e-7) for a, x in zip(applied, g)), "gradient was touched"
        stats = opt.last_stats
        results[reference] = stats
        assert bool(stats.skipped) and not bool(stats.projected)
        assert "non-finite values (inf/NaN)" in stats.reason and "gradient left untouched" in stats.reason
        if reference == "ema":
            assert "capture 0" in stats.reason and "EMA" in stats.reason
            assert all(torch.equal(a, b) for a, b in zip(ema_before, opt._ema[0])), "EMA changed"


def _trained(reference="live", **kw):
    model = _model()
    cap, saf = _losses(model)
    opt = ProjectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), reference=reference, **kw)
    for _ in range(2):
        opt.zero_grad()
        cap().backward()
        opt.capture_reference()
        saf().backward()
        opt.step()
    return model, opt


def test_load_state_dict_keeps_constructor_settings_and_warns():
    _, opt = _trained(mode="conflict", strength=0.5)
    state = opt.state_dict()
    model2 = _model()
    opt2 = ProjectedOptimizer(torch.optim.AdamW(model2.parameters(), lr=1e-2), mode="orthogonal", strength=1.0)
    with pytest.warns(UserWarning, match=r"keeping the constructor's.*mode: checkpoint 'conflict'.*strength"):
        opt2.load_state_dict(state)
    assert opt2.mode == "orthogonal" and opt2.strength == 1.0
    assert opt2.state_dict()["optimizer"]["state"][0]["step"] == 2  # the inner state did load
    same = ProjectedOptimizer(torch.optim.AdamW(_model().parameters(), lr=1e-2), mode="conflict", strength=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matching settings: silent
        same.load_state_dict(state)


def test_load_plain_inner_optimizer_checkpoint():
    model = _model()
    cap, saf = _losses(model)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)  # a plain fine-tuning run
    saf().backward()
    plain.step()
    ckpt = plain.state_dict()
    twin = _model()
    twin.load_state_dict(model.state_dict())
    wrapped = ProjectedOptimizer(torch.optim.AdamW(twin.parameters(), lr=1e-2))
    wrapped.load_state_dict(copy.deepcopy(ckpt))
    ref = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref.load_state_dict(copy.deepcopy(ckpt))
    # The next step, with projection (reference captured), continues from the loaded moments.
    for m, o in ((model, None), (twin, wrapped)):
        c2, s2 = _losses(m, seed=5)
        m.zero_grad()
        if o is not None:
            c2().backward()
            o.capture_reference()
        s2().backward()
        (o or ref).step()
    assert wrapped.optimizer.state_dict()["state"][0]["step"] == 2
    assert bool(wrapped.last_stats.projected)
    assert wrapped._steps == 1 and not wrapped._ema


# --- items 4, 5, 6: attach ------------------------------------------------------------------------------------

def _fake_trainer():
    import types

    args = types.SimpleNamespace(optim="adamw_torch", gradient_checkpointing=False, gradient_checkpointing_kwargs=None)
    return types.SimpleNamespace(args=args, is_deepspeed_enabled=False, model=torch.nn.Linear(2, 2), optimizer=None,
                                 training_step=lambda *a: None, log=lambda *a: None, add_callback=lambda c: None,
                                 remove_callback=lambda c: None, accelerator=types.SimpleNamespace())


def test_attach_refuses_a_model_or_a_zero_arg_loss_callable():
    pytest.importorskip("transformers")
    from atax_kernels.integrations.hf import EMA, CapabilitySource, attach

    t = _fake_trainer()
    loss = t.model(torch.ones(2)).sum()
    with pytest.raises(TypeError, match="reference is a torch.nn.Module .*capability batches"):
        attach(t, reference=t.model)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        attach(t, reference=torch.nn.Sequential(torch.nn.Linear(2, 2)))  # iterable, but still a model
    with pytest.raises(TypeError, match=r"takes the model: \(model\) -> loss.*reference_fn"):
        attach(t, reference=lambda: loss)
    with pytest.raises(TypeError, match=r"takes the model"):
        EMA(lambda: loss)  # an EMA's source follows the same convention
    with pytest.raises(TypeError, match="tensor"):
        attach(t, reference=loss)
    with pytest.raises(TypeError, match=r"loss_fn must take \(model, batch\)"):
        CapabilitySource([{"x": 1}], loss_fn=lambda m: loss)
    with pytest.raises(TypeError, match=r"loss_fn must take \(model\)"):
        CapabilitySource(None, loss_fn=lambda: loss)
    h = attach(t, reference=lambda model: loss)  # the convention attach documents
    h.detach()


def test_projected_optimizer_reference_fn_says_what_it_expects():
    model = _model()
    with pytest.raises(TypeError, match=r"called with no arguments.*torch.nn.Module.*attach"):
        ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reference_fn=model)
    with pytest.raises(TypeError, match=r"called with no arguments.*needs arguments.*\(model\) -> loss"):
        ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reference_fn=lambda m: m)
    ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reference_fn=lambda: None)


def _hf():
    pytest.importorskip("transformers")
    pytest.importorskip("datasets")
    import test_hf_integration as H

    return H


@pytest.mark.parametrize("stream", ["list", "shuffled_loader", "ema_refresh2", "activation_c0.5_ckpt3",
                                    "activation_c0.5_ckpt2"])
def test_attach_resume_mid_run_is_bit_exact_with_several_capability_batches(tmp_path, stream):
    H = _hf()
    from transformers import Trainer, TrainingArguments

    from atax_kernels import ActivationSubspace
    from atax_kernels.integrations.hf import EMA, attach

    tok = H.make_tokenizer()
    cap = H.capability_batches(tok, n=3)
    activation = stream.startswith("activation")
    refresh = 2 if stream == "ema_refresh2" or activation else 1
    # Activation (issue 17 item 4): with contrast > 0 the training batches' forwards are the safety side; the
    # moments gathered between refreshes must survive the checkpoint (ckpt 2: mid-window; ckpt 3: right after
    # a refresh, the next window starts in the resumed run).
    save_at = 3 if stream.endswith("ckpt3") else 2

    def reference(model):
        if stream == "shuffled_loader":
            return torch.utils.data.DataLoader(cap, batch_size=None, shuffle=True)
        if stream == "ema_refresh2":
            return EMA(cap, beta=0.5)
        if activation:
            return ActivationSubspace.from_loader(model, cap, energy=0.9, contrast=0.5)
        return cap

    def run(out, max_steps, resume=None):
        kw = H.base_args(tmp_path / out, max_steps=max_steps, save_strategy="steps", save_steps=save_at,
                         gradient_accumulation_steps=1)
        model = H.make_model(tok)
        trainer = Trainer(model=model, args=TrainingArguments(**kw), train_dataset=H.lm_dataset(tok))
        attach(trainer, reference=reference(model), refresh_every=refresh)
        trainer.train(resume_from_checkpoint=resume)
        return [p.detach().clone() for p in trainer.model.parameters()]

    steps = 5 if activation else 7   # activation: refreshes at steps 1, 3, 5 (contrast: step 1 too)
    full = run("full", steps)  # captures at steps 1..7 walk over the 3 batches 2 1/3 times
    # Mid-pass: step 3 draws the third batch (a restarted stream would draw the first).
    ckpt = tmp_path / "full" / "out" / f"checkpoint-{save_at}"
    resumed = run("resumed", steps, resume=str(ckpt))
    diff = max(float((a - b).abs().max()) for a, b in zip(full, resumed))
    assert diff == 0.0, f"resumed run differs from the uninterrupted one by {diff:.3e}"


def test_attach_metrics_are_means_over_the_logging_window(tmp_path):
    H = _hf()
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from atax_kernels.integrations.hf import attach

    tok = H.make_tokenizer()
    per_step = []

    class Record(TrainerCallback):  # after the projection, before the optimizer step: this step's statistics
        def on_pre_optimizer_step(self, args, state, control, **kw):
            s = handle.last_stats
            per_step.append((float(s.cosines[0]), float(s.removed_fraction), float(handle.last_ref_norm[0]),
                             float(s.cosines[0]) ** 2))

    kw = H.base_args(tmp_path, max_steps=4, logging_steps=2, gradient_accumulation_steps=1)
    trainer = Trainer(model=H.make_model(tok), args=TrainingArguments(**kw), train_dataset=H.lm_dataset(tok),
                      callbacks=[Record()])
    handle = attach(trainer, reference=H.capability_batches(tok, n=3), log_tax_rate=True)
    trainer.train()
    logs = H.atax_logs(trainer)
    assert len(logs) == 2 and len(per_step) == 4
    for w, log in enumerate(logs):
        window = per_step[2 * w:2 * w + 2]
        assert window[0][0] != window[1][0]  # the steps differ, so a mean differs from the last value
        for j, key in enumerate(("atax/cosine", "atax/removed_fraction", "atax/ref_norm", "atax/tax_rate")):
            want = sum(v[j] for v in window) / 2
            assert log[key] == pytest.approx(want, rel=1e-9, abs=1e-12), (w, key, log[key], window)
        assert log["atax/skipped"] == 0.0


def test_attach_window_skipped_fraction_and_skipped_steps_left_out():
    # The window arithmetic on its own: one skipped step of two, NaN cosine on the skipped one.
    pytest.importorskip("transformers")
    from atax_kernels.integrations.hf import AtaxHandle

    h = AtaxHandle.__new__(AtaxHandle)
    h.mode, h.strength, h.granularity, h.log_tax_rate, h._window = "orthogonal", 1.0, "global", True, None
    good = {"cosine": torch.tensor([0.5], dtype=torch.float64), "removed_fraction": torch.tensor(0.5, dtype=torch.float64),
            "ref_norm": torch.tensor([2.0], dtype=torch.float64), "tax_rate": torch.tensor(0.25, dtype=torch.float64)}
    bad = {k: torch.full_like(v, float("nan")) for k, v in good.items()}
    h._window_add(good, skipped=torch.tensor(False))
    h._window_add(bad, skipped=torch.tensor(True))
    h.reference = None
    values = h.log_values()
    assert values == {"atax/cosine": 0.5, "atax/ref_norm": 2.0, "atax/removed_fraction": 0.5, "atax/skipped": 0.5,
                      "atax/tax_rate": 0.25}
