"""Held-out splits and evaluation of the tiny tasks: disjoint, deterministic, and scores that could not have
come from training pairs (a model that knows only the train pairs scores ~0 held out)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from atax_kernels import tasks  # noqa: E402
from atax_kernels.tasks import data as C  # noqa: E402

TASKS = [tasks.get(n) for n in tasks.TASKS]


def _as_set(pairs: torch.Tensor) -> set[tuple[int, int]]:
    return set(map(tuple, pairs.tolist()))


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_splits_are_disjoint_cover_each_side_and_are_deterministic(task):
    s = task.splits(seed=3)
    for side in ("capability", "safety"):
        train, ev = _as_set(getattr(s, f"{side}_train")), _as_set(getattr(s, f"{side}_eval"))
        assert not train & ev
        assert train | ev == _as_set(getattr(task, f"{side}_pairs")())
    again = task.splits(seed=3)
    other = task.splits(seed=4)
    for key in s.sizes():
        assert torch.equal(getattr(s, key), getattr(again, key))
    assert not torch.equal(s.capability_train, other.capability_train)
    n_cap = task.capability_pairs().shape[0]
    assert s.sizes()["capability_train"] == round(0.25 * n_cap)
    assert abs(s.sizes()["safety_train"] - s.sizes()["safety_eval"]) <= 1


def test_overflow_task_shares_every_token_and_splits_by_content():
    T = tasks.get("overflow")
    cap, saf = T.capability_pairs(), T.safety_pairs()
    assert bool((cap.sum(1) < C.P).all()) and bool((saf.sum(1) >= C.P).all())
    assert cap.shape[0] + saf.shape[0] == C.P * C.P
    cap_ids, cap_labels = T.capability_prompts(cap)
    saf_ids, saf_labels = T.safety_prompts(saf)
    # no dedicated trigger token: every token of a safety prompt also appears in capability prompts
    assert set(saf_ids.unique().tolist()) <= set(cap_ids.unique().tolist())
    assert C.MARKER not in cap_ids and C.MARKER not in saf_ids
    assert bool((saf_labels[:, -1] == C.REFUSE).all())
    assert torch.equal(cap_labels[:, -1], cap.sum(1))


class _Lookup(torch.nn.Module):
    """A 'model' that answers correctly exactly the capability prompts of the given pairs (and REFUSE for the
    given safety pairs), and a wrong number everywhere else: memorisation without generalisation."""

    def __init__(self, task, known_cap: torch.Tensor, known_saf: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answers: dict[tuple, int] = {}
        ids, labels = task.capability_prompts(known_cap)
        for row, lab in zip(ids.tolist(), labels[:, -1].tolist()):
            self.answers[tuple(row)] = lab
        ids, _ = task.safety_prompts(known_saf)
        for row in ids.tolist():
            self.answers[tuple(row)] = C.REFUSE

    def forward(self, input_ids):
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], C.VOCAB_SIZE)
        for i, row in enumerate(input_ids.tolist()):
            true = (row[1] + row[3]) % C.P
            logits[i, -1, self.answers.get(tuple(row), (true + 1) % C.P)] = 1.0
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_a_model_that_memorised_the_train_split_scores_zero_held_out(task):
    s = task.splits(seed=0)
    scores = task.evaluate(_Lookup(task, s.capability_train, s.safety_train), s)
    assert scores["capability_train"] == 1.0 and scores["safety_train"] == 1.0
    assert scores["capability"] == 0.0 and scores["safety"] == 0.0
    # and the mirror image: knowing only the eval split is seen as eval skill
    scores = task.evaluate(_Lookup(task, s.capability_eval, s.safety_eval), s)
    assert scores["capability"] == 1.0 and scores["capability_train"] == 0.0


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_training_streams_draw_only_from_the_train_splits(task, monkeypatch):
    s = task.splits(seed=1)
    seen: dict[str, set] = {"capability": set(), "safety": set()}
    real_cap, real_saf = task.capability_prompts, task.safety_prompts

    def spy(side, real):
        def inner(pairs):
            seen[side] |= _as_set(pairs)
            return real(pairs)
        return inner

    model = C.make_model(seed=0)
    monkeypatch.setattr(task, "capability_prompts", spy("capability", real_cap))
    monkeypatch.setattr(task, "safety_prompts", spy("safety", real_saf))
    monkeypatch.setattr(task, "evaluate", lambda model, splits=None: {})  # the final scoring reads eval, by design
    for kw in (dict(method="ptx", ptx_weight=1.0), dict(method="projected", reference="loss", n_refs=2),
               dict(method="kl", kl_weight=0.5), dict(method="projected", reference="tempered", target="update")):
        task.finetune_safety(model, splits=s, steps=3, copy_model=True, backend="torch", **kw)
    assert seen["capability"] and seen["capability"] <= _as_set(s.capability_train)
    assert seen["safety"] and seen["safety"] <= _as_set(s.safety_train)


def test_bad_splits_and_methods_are_clear_errors():
    T = tasks.get("modular")
    s = T.splits(0)
    with pytest.raises(ValueError, match="both capability_train and capability_eval"):
        C.Splits(s.capability_train, s.capability_train[:3], s.safety_train, s.safety_eval)
    with pytest.raises(ValueError, match=r"shape \[n, 2\]"):
        C.Splits(s.capability_train[:, :1], s.capability_eval, s.safety_train, s.safety_eval)
    with pytest.raises(ValueError, match="capability_train_fraction"):
        T.splits(0, capability_train_fraction=1.5)
    with pytest.raises(ValueError, match="made by task 'overflow'"):
        T.evaluate(C.make_model(0), tasks.get("overflow").splits(0))
    with pytest.raises(ValueError, match="method must be one of"):
        T.finetune_safety(C.make_model(0), method="nope")
    with pytest.raises(ValueError, match="needs ptx_weight > 0"):
        T.finetune_safety(C.make_model(0), method="ptx")
    with pytest.raises(ValueError, match="unknown task"):
        tasks.get("nope")


@pytest.mark.functional
@pytest.mark.parametrize("name", tasks.TASKS)
def test_base_models_reach_full_capability(name):
    torch.set_num_threads(1)
    T = tasks.get(name)
    model = C.make_model(seed=0)
    info = T.pretrain(model)
    assert info["capability"] >= 0.98 and info["capability_train"] >= 0.98, info
    assert info["safety"] <= 0.05, info
