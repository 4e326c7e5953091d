"""``refresh_every=RefreshSchedule(...)`` on the optimizer and trainer paths: ``ProjectedOptimizer(reference_fn=...,
activation_subspace=...)`` and ``attach(trainer, reference=ActivationSubspace)`` check the bases at the schedule's
steps, rebuild only when the observed capability data left them, save the schedule's position in checkpoints,
and refuse what a drift check cannot judge before any step."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from atax_kernels import ActivationSubspace, ProjectedOptimizer, RefreshSchedule


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.Identity(), nn.Linear(16, 4)).double()


def inputs_in(span_seed: int, n: int = 30, rank: int = 3) -> torch.Tensor:
    """``n`` inputs spanning a random ``rank``-dimensional subspace of R^8 picked by ``span_seed``."""
    g = torch.Generator().manual_seed(span_seed)
    return torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, 8, generator=g,
                                                                                 dtype=torch.float64)


def safety_loss(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return (model(torch.randn(16, 8, generator=g, dtype=torch.float64)) - 1.0).square().mean()


def run_optimizer(opt: ProjectedOptimizer, model: nn.Module, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        safety_loss(model, step).backward()
        opt.step()


def built_subspace(model: nn.Module, x: torch.Tensor, **kw) -> ActivationSubspace:
    sub = ActivationSubspace(model, energy=0.99, basis_dtype=torch.float64, biases="freeze", **kw)
    with torch.no_grad(), sub.observe():
        model(x)
    sub.update()
    return sub


def test_schedule_checks_instead_of_rebuilding_while_the_data_stays():
    """Same capability inputs at every check and a tiny learning rate: the bases hold them, so the checks at
    steps 2 and 6 (the interval doubles 2 -> 4 -> 8) keep them (no update); the int interval rebuilds at 0, 2,
    4, 6. Each check costs one reference_fn call."""
    x = inputs_in(1)
    calls = {"schedule": 0, "fixed": 0}
    results = {}
    for kind, every in (("schedule", RefreshSchedule(every=2, tol=0.02)), ("fixed", 2)):
        model = mlp()
        sub = built_subspace(model, x)

        def forward(kind=kind, model=model):
            calls[kind] += 1
            return model(x)

        opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-6), activation_subspace=sub,
                                 reference_fn=forward, refresh_every=every)
        run_optimizer(opt, model, range(8))
        results[kind] = (sub.updates, every)
    assert calls == {"schedule": 2, "fixed": 4}
    assert results["fixed"][0] == 1 + 4
    schedule = results["schedule"][1]
    assert results["schedule"][0] == 1   # only the build before the optimizer: both checks kept the bases
    assert schedule.history == [(2, False), (6, False)] and schedule.next_step == 14


def test_schedule_rebuilds_when_the_capability_inputs_move():
    """From step 3 on, reference_fn shows inputs in another span: the bases no longer hold them (coverage
    below energy - tol), so the next check rebuilds, the interval falls back to `every`, and the new bases
    span the new inputs (their update is then zero on them)."""
    x_old, x_new = inputs_in(1), inputs_in(7)
    model = mlp()
    sub = built_subspace(model, x_old)
    steps_done = {"n": 0}

    def forward():
        return model(x_old if steps_done["n"] < 3 else x_new)

    schedule = RefreshSchedule(every=2, tol=0.02)
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), activation_subspace=sub,
                             reference_fn=forward, refresh_every=schedule)
    for step in range(6):
        steps_done["n"] = step
        run_optimizer(opt, model, [step])
    # checks at 2 (old inputs: kept, next at 6) ... then 6 is past the loop; run to it
    assert schedule.history == [(2, False)]
    steps_done["n"] = 6
    with torch.no_grad():
        before = model(x_new)
    run_optimizer(opt, model, [6])
    assert schedule.history == [(2, False), (6, True)] and schedule.interval == 2
    assert sub.updates == 2
    with torch.no_grad():
        moved = (model(x_new) - before).abs().max()
    assert moved <= 1e-9 * before.abs().max()   # the step after the rebuild leaves the new inputs' outputs


def test_schedule_builds_missing_bases_at_step_zero():
    """No bases yet: step 0 builds them from reference_fn (the first check is still at `every`)."""
    x = inputs_in(1)
    model = mlp()
    sub = ActivationSubspace(model, energy=0.99, basis_dtype=torch.float64)
    schedule = RefreshSchedule(every=3, tol=0.02)
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-6), activation_subspace=sub,
                             reference_fn=lambda: model(x), refresh_every=schedule)
    run_optimizer(opt, model, range(1))
    assert sub.updates == 1 and schedule.history == [] and schedule.next_step == 3


def three_steps_with_a_schedule():
    """An optimizer with RefreshSchedule(every=2, tol=0.02) after 3 steps at a tiny rate (one check, kept)."""
    x = inputs_in(1)
    model = mlp()
    sub = built_subspace(model, x)
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-6), activation_subspace=sub,
                             reference_fn=lambda: model(x), refresh_every=RefreshSchedule(every=2, tol=0.02))
    run_optimizer(opt, model, range(3))
    return x, model, sub, opt


def test_schedule_position_is_saved_and_resumed():
    x, model, sub, opt = three_steps_with_a_schedule()
    state = opt.state_dict()
    assert state["atax"]["settings"]["refresh_every"]["next_step"] == 6

    same = RefreshSchedule(every=2, tol=0.02)
    opt2 = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-6), activation_subspace=sub,
                              reference_fn=lambda: model(x), refresh_every=same)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.load_state_dict(state)
    assert same.next_step == 6 and same.history == [(2, False)]

    other = RefreshSchedule(every=5, tol=0.02)
    opt3 = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-6), activation_subspace=sub,
                              reference_fn=lambda: model(x), refresh_every=other)
    with pytest.warns(UserWarning, match="refresh_every"):
        opt3.load_state_dict(state)
    assert other.next_step == 5 and other.history == []

    fixed = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-6), activation_subspace=sub,
                               reference_fn=lambda: model(x), refresh_every=2)
    with pytest.warns(UserWarning, match=r"saved with refresh_every=RefreshSchedule\(every=2.*keeping refresh_every=2"):
        fixed.load_state_dict(state)


def test_optimizer_refuses_a_schedule_it_cannot_run():
    x = inputs_in(1)
    model = mlp()
    sub = built_subspace(model, x)
    inner = torch.optim.SGD(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="needs both"):
        ProjectedOptimizer(inner, activation_subspace=sub, refresh_every=RefreshSchedule(2))
    with pytest.raises(ValueError, match="needs both"):
        ProjectedOptimizer(inner, reference_fn=lambda: model(x).sum(), refresh_every=RefreshSchedule(2))
    contrasted = built_subspace(mlp(), x, contrast=0.5)
    with pytest.raises(ValueError, match="contrast"):
        ProjectedOptimizer(torch.optim.SGD(contrasted.model.parameters(), lr=1e-3), activation_subspace=contrasted,
                           reference_fn=lambda: contrasted.model(x), refresh_every=RefreshSchedule(2, tol=0.02))
    for bad in (0, -1, 1.5, "2", True, None):
        with pytest.raises(ValueError, match="refresh_every"):
            ProjectedOptimizer(inner, activation_subspace=sub, reference_fn=lambda: model(x), refresh_every=bad)
    # a schedule without a drift check (tol=None) is a fixed interval and needs no more than an int does
    contrasted_fixed = ProjectedOptimizer(torch.optim.SGD(contrasted.model.parameters(), lr=1e-3),
                                          activation_subspace=contrasted, reference_fn=lambda: contrasted.model(x),
                                          refresh_every=RefreshSchedule(2, tol=None))
    assert contrasted_fixed.refresh_every.adaptive is False


def test_schedule_state_is_bounded_validated_and_reset():
    """history keeps the last HISTORY checks; a malformed saved state raises and changes nothing (the schedule,
    the optimizer); a plain inner-optimizer state dict restarts the step count and the schedule with it."""
    schedule = RefreshSchedule(every=1, tol=0.02, max_every=1)
    for step in range(1, RefreshSchedule.HISTORY + 10):
        schedule.record(step, moved=False)
    assert len(schedule.history) == RefreshSchedule.HISTORY and schedule.history[-1][0] == RefreshSchedule.HISTORY + 9
    before = schedule.state_dict()
    with pytest.raises(ValueError, match="malformed"):
        schedule.load_state_dict(dict(before, next_step="soon"))
    assert schedule.state_dict() == before

    x, model, sub, opt = three_steps_with_a_schedule()
    state = opt.state_dict()
    bad = {"optimizer": state["optimizer"], "atax": dict(state["atax"], steps=0, settings=dict(
        state["atax"]["settings"], refresh_every=dict(state["atax"]["settings"]["refresh_every"], interval=None)))}
    position = opt.refresh_every.state_dict()
    with pytest.raises(ValueError, match="malformed"):
        opt.load_state_dict(bad)
    assert opt._steps == 3 and opt.refresh_every.state_dict() == position
    opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=1e-6).state_dict())
    assert opt._steps == 0 and opt.refresh_every.next_step == 2 and opt.refresh_every.history == []


# -- the trainer path ---------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

from transformers import Trainer, TrainingArguments  # noqa: E402

from atax_kernels.integrations.hf import REFERENCE_FILE, attach  # noqa: E402
from test_hf_integration import base_args, capability_batches, lm_dataset, make_model, make_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def counting_refresh(sub: ActivationSubspace, monkeypatch) -> list:
    """Record the ``tol`` of each ``sub.refresh`` call the trainer path makes (the call still runs)."""
    seen, original = [], sub.refresh

    def refresh(decay: float = 0.0, *, tol=None):
        seen.append(tol)
        return original(decay, tol=tol)

    monkeypatch.setattr(sub, "refresh", refresh)
    return seen


def test_attach_checks_on_the_schedule_and_saves_it(tok, tmp_path, monkeypatch):
    """5 optimizer steps, RefreshSchedule(every=2, tol=0.5) (a loose tol: the bases are kept): checks at steps
    2 and 6 would be due, so only the one at 2 runs, with the tol; the int interval refreshes at 2 and 4 with
    no tol. The checkpoint holds the schedule's position and a resumed run continues from it."""
    cap = capability_batches(tok, 1)
    kw = base_args(tmp_path, max_steps=5, save_strategy="steps", save_steps=5)
    model = make_model(tok)
    sub = ActivationSubspace.from_loader(model, cap, energy=0.9)
    seen = counting_refresh(sub, monkeypatch)
    schedule = RefreshSchedule(every=2, tol=0.5)
    trainer = Trainer(model=model, args=TrainingArguments(**kw), train_dataset=lm_dataset(tok))
    handle = attach(trainer, reference=sub, refresh_every=schedule)
    trainer.train()
    assert seen == [0.5] and schedule.history == [(2, False)] and sub.updates == 1
    saved = torch.load(tmp_path / "out" / "checkpoint-5" / REFERENCE_FILE, weights_only=True)
    assert saved["settings"]["refresh_every"]["next_step"] == 6
    handle.detach()

    model_fixed = make_model(tok)
    sub_fixed = ActivationSubspace.from_loader(model_fixed, cap, energy=0.9)
    seen_fixed = counting_refresh(sub_fixed, monkeypatch)
    trainer_fixed = Trainer(model=model_fixed, args=TrainingArguments(**dict(kw, save_strategy="no",
                                                                            output_dir=str(tmp_path / "fixed"))),
                            train_dataset=lm_dataset(tok))
    attach(trainer_fixed, reference=sub_fixed, refresh_every=2)
    trainer_fixed.train()
    assert seen_fixed == [None, None] and sub_fixed.updates == 3

    model2 = make_model(tok)
    sub2 = ActivationSubspace.from_loader(model2, cap, energy=0.9)
    seen2 = counting_refresh(sub2, monkeypatch)
    resumed = RefreshSchedule(every=2, tol=0.5)
    trainer2 = Trainer(model=model2, args=TrainingArguments(**dict(kw, max_steps=7, save_strategy="no")),
                       train_dataset=lm_dataset(tok))
    attach(trainer2, reference=sub2, refresh_every=resumed)
    trainer2.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-5"))
    assert resumed.history == [(2, False), (6, False)] and seen2 == [0.5]   # only the check at 6 ran here

    model3 = make_model(tok)
    sub3 = ActivationSubspace.from_loader(model3, cap, energy=0.9)
    trainer3 = Trainer(model=model3, args=TrainingArguments(**dict(kw, max_steps=6, save_strategy="no")),
                       train_dataset=lm_dataset(tok))
    attach(trainer3, reference=sub3, refresh_every=2)
    with pytest.warns(UserWarning, match="RefreshSchedule.every=2"):
        trainer3.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-5"))


def test_attach_refuses_a_schedule_it_cannot_run(tok, tmp_path):
    cap = capability_batches(tok, 1)
    model = make_model(tok)
    trainer = Trainer(model=model, args=TrainingArguments(**base_args(tmp_path)), train_dataset=lm_dataset(tok))
    with pytest.raises(ValueError, match="ActivationSubspace reference"):
        attach(trainer, reference=cap, refresh_every=RefreshSchedule(2))
    observed_by_hand = ActivationSubspace(model, energy=0.9)
    with torch.no_grad(), observed_by_hand.observe():
        model(input_ids=cap[0]["input_ids"], attention_mask=cap[0]["attention_mask"])
    with pytest.raises(ValueError, match="from_loader"):
        attach(trainer, reference=observed_by_hand, refresh_every=RefreshSchedule(2, tol=0.02))
    contrasted = ActivationSubspace.from_loader(model, cap, energy=0.9, contrast=0.5)
    with pytest.raises(ValueError, match="contrast"):
        attach(trainer, reference=contrasted, refresh_every=RefreshSchedule(2, tol=0.02))
    with pytest.raises(ValueError, match="refresh_every"):
        attach(trainer, reference=cap, refresh_every=0)
    assert getattr(trainer, "_atax_handle", None) is None   # nothing installed by a refused attach
