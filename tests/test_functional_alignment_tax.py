"""Functional test: ProjectedOptimizer lowers the alignment tax on the tiny modular-addition task.

A tiny Llama (hidden 64, 2 layers) is pretrained to 100 % on ``a + b mod 23`` (once per module), then
fine-tuned for safety (MARKER prompts -> REFUSE; 300 AdamW steps, lr 3e-4, batch 64) on the task's default
splits (seed 0): references and PTX draw from ``capability_train``, every score below is held out
(``capability_eval`` / ``safety_eval``). Every variant reaches ~100 % held-out safety; they differ in how much
capability survives.

Select with ``-m functional`` (deselect with ``-m "not functional"``). ~45 s (runs on one thread).

Thresholds sit well below the measured values (seed 0, CPU, torch 2.14; measured with 1 and with 2
threads, which change float summation order and hence the trajectory a little) and above the plain
baseline, to tolerate run-to-run and machine-to-machine differences. Projection uses the pure-PyTorch
backend so the test does not depend on (or wait for) the C++ extension build.
"""
import pytest
import torch

pytest.importorskip("transformers")

from atax_kernels.tasks import modular as M  # noqa: E402

pytestmark = pytest.mark.functional

STEPS, LR = 300, 3e-4
COMMON = dict(steps=STEPS, lr=LR, copy_model=True, backend="torch", seed=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the model is tiny, and 2 threads beside any other busy process thrash (a 2 s
    fine-tuning run took 75 s next to a benchmark); 1 thread gives the same results ~as fast, predictably."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pretrained(one_thread):
    model = M.make_model(seed=0)
    info = M.pretrain(model, steps=300, lr=3e-3, seed=0)  # measured: 100 % capability, 0 % safety, 8-12 s
    assert info["capability"] >= 0.98, info
    assert info["safety"] <= 0.05, info
    return model


def _run(model, **kw):
    out = M.finetune_safety(model, **COMMON, **kw)
    out.pop("model")
    return out


@pytest.fixture(scope="module")
def plain(pretrained):
    return _run(pretrained, method="plain")


@pytest.fixture(scope="module")
def margin_one_ref(pretrained):
    return _run(pretrained, method="projected", reference="margin", n_refs=1, target="grad", impl="optim")


def test_plain_finetuning_pays_the_tax(plain):
    assert plain["safety"] >= 0.98, plain          # measured 1.00
    assert plain["capability"] <= 0.10, plain      # measured 0.003 held out (unmarked prompts -> REFUSE)


def test_margin_reference_keeps_more_capability(plain, margin_one_ref):
    out = margin_one_ref
    assert out["impl"] == "optim"
    assert out["safety"] >= 0.98, out              # measured 1.00
    assert out["capability"] >= 0.12, out          # measured 0.310 held out, 0.341 on capability_train
    assert out["capability"] >= plain["capability"] + 0.10, (out, plain)


def test_update_projection_with_several_references_keeps_more_still(pretrained, margin_one_ref):
    out = _run(pretrained, method="projected", reference="margin", n_refs=4, target="update", impl="optim")
    assert out["safety"] >= 0.98, out              # measured 1.00
    assert out["capability"] >= 0.45, out          # measured 0.660 held out (1 ref, grad target: 0.310)
    assert out["capability"] >= margin_one_ref["capability"] + 0.20, (out, margin_one_ref)


def test_ptx_weight_restores_capability(pretrained, margin_one_ref):
    out = _run(pretrained, method="projected", reference="margin", n_refs=1, target="grad", ptx_weight=0.1,
               impl="optim")
    assert out["safety"] >= 0.98, out              # measured 1.00
    assert out["capability"] >= 0.70, out          # measured 0.874 held out, 1.000 on capability_train
    assert out["capability_train"] >= out["capability"], out  # PTX fits the pairs it trains on


def test_manual_loop_matches_optimizer(pretrained, margin_one_ref):
    """The hand-written project_ loop in tasks.modular is the same algorithm: same numbers, same seed."""
    out = _run(pretrained, method="projected", reference="margin", n_refs=1, target="grad", impl="manual")
    assert out["impl"] == "manual"
    assert out["safety"] >= 0.98, out
    assert abs(out["capability"] - margin_one_ref["capability"]) <= 0.05, (out, margin_one_ref)
