"""``attach(trainer, reference=ActivationSubspace.from_loader(...))`` on transformers.Trainer (CPU, tiny Llama)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

from transformers import Trainer, TrainingArguments  # noqa: E402

from atax_kernels import ActivationSubspace  # noqa: E402
from atax_kernels.integrations.hf import REFERENCE_FILE, attach  # noqa: E402
from test_hf_integration import atax_logs, base_args, capability_batches, lm_dataset, make_model, make_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def cap_logits(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train()
    return out[batch["attention_mask"] == 1]


def test_attach_keeps_capability_logits_and_logs(tok, tmp_path):
    """One capability batch (12 positions < d = 32), energy 1, norms frozen: after 2 optimizer steps the
    capability logits move >= 1e4x less than under plain training; the atax/* metrics are logged."""
    cap = capability_batches(tok, 1)
    model, plain = make_model(tok), make_model(tok)
    before = cap_logits(model, cap[0])
    args = base_args(tmp_path, learning_rate=1e-2)
    sub = ActivationSubspace.from_loader(model, cap, energy=1.0, norms="freeze")
    assert sub.updates == 1 and set(sub.ranks().values()) - {0}
    trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=lm_dataset(tok))
    handle = attach(trainer, reference=sub, refresh_every=1)
    trainer.train()
    Trainer(model=plain, args=TrainingArguments(**dict(args, output_dir=str(tmp_path / "plain"))),
            train_dataset=lm_dataset(tok)).train()
    drift = (cap_logits(model, cap[0]) - before).abs().max()
    drift_plain = (cap_logits(plain, cap[0]) - before).abs().max()
    assert drift_plain > 1e-2
    assert drift <= 1e-4 * drift_plain, (float(drift), float(drift_plain))
    logs = atax_logs(trainer)
    assert len(logs) == 2
    for entry in logs:
        assert 0 < entry["atax/update_removed_fraction"] < 1
        assert entry["atax/feature_rank_mean"] == pytest.approx(sub_rank_mean(sub))
    assert sub.updates == 2  # from_loader, then the refresh before step 2
    handle.detach()
    assert handle._act_hooks == []


def sub_rank_mean(sub):
    r = list(sub.ranks().values())
    return sum(r) / len(r)


def test_checkpoint_saves_and_restores_bases(tok, tmp_path):
    cap = capability_batches(tok, 1)
    kw = base_args(tmp_path, save_strategy="steps", save_steps=2)
    model = make_model(tok)
    sub = ActivationSubspace.from_loader(model, cap, energy=0.9)
    trainer = Trainer(model=model, args=TrainingArguments(**kw), train_dataset=lm_dataset(tok))
    attach(trainer, reference=sub, refresh_every=10)
    trainer.train()
    saved = torch.load(tmp_path / "out" / "checkpoint-2" / REFERENCE_FILE, weights_only=True)
    assert saved["kind"] == "ActivationSubspace" and saved["steps"] == 2
    for g, gs in zip(sub._groups, saved["activation"]["groups"]):
        assert torch.equal(g.basis, gs["basis"])

    model2 = make_model(tok, seed=5)
    sub2 = ActivationSubspace.from_loader(model2, capability_batches(tok, 3)[1:], energy=0.5)
    trainer2 = Trainer(model=model2, args=TrainingArguments(**dict(kw, max_steps=3)), train_dataset=lm_dataset(tok))
    handle2 = attach(trainer2, reference=sub2, refresh_every=10)
    trainer2.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert handle2.steps == 3 and sub2.energy == 0.9
    for g, gs in zip(sub2._groups, saved["activation"]["groups"]):
        assert torch.equal(g.basis, gs["basis"])


def test_contrast_observes_the_training_batch_as_safety(tok, tmp_path):
    cap = capability_batches(tok, 1)
    model = make_model(tok)
    sub = ActivationSubspace.from_loader(model, cap, energy=0.99, contrast=1.0)
    sides = []
    orig = sub.observe

    def spy(side="capability", attention_mask=None):
        sides.append((side, attention_mask is not None))
        return orig(side=side, attention_mask=attention_mask)

    sub.observe = spy
    trainer = Trainer(model=model, args=TrainingArguments(**base_args(tmp_path)), train_dataset=lm_dataset(tok))
    attach(trainer, reference=sub, refresh_every=1)
    trainer.train()
    assert [s for s, _ in sides].count("safety") == 4   # 2 steps x 2 micro-batches
    assert sides.count(("capability", True)) == 2  # the refresh before each step (contrast: step 1 too)
    assert sub.updates == 3
