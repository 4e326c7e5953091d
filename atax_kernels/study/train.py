"""Safety fine-tuning of one model copy with one mitigation (see :mod:`atax_kernels.study.methods`).

Every run draws only from train splits: safety batches from ``harmful`` train (prompt -> refusal for SFT;
chosen = refusal, rejected = the base model's own answer for DPO; with a method's ``la=1`` also the ``lookalike``
train prompts the base answers, with that answer, for DPO preferred over a refusal; ``la=nll``: as NLL rows beside
the DPO loss), retain batches (PTX, KL, gradient
references, activation bases) from capability + benign train with the base model's own answers.

Objectives:

* ``sft``: cross-entropy on the response tokens only (the chat template applied by ``models.chat_pair``).
* ``dpo``: the sigmoid DPO loss ``-log σ(β [(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))])`` over
  response tokens, the reference being the frozen base, whose log-probabilities of every train pair are
  computed once per split (as TRL's ``precompute_ref_log_probs``). Written here rather than through TRL's
  ``DPOTrainer`` so that every mitigation (PTX, KL, both projections, interpolation) shares one loop and one
  timer, and the projections attach through ``ProjectedOptimizer`` as a user's own loop would.

The optimizer is AdamW (constant rate, no warm-up); every backward is its own (a PTX / KL / reference term is
backpropagated apart and accumulated), so a DDP-wrapped model sees one forward per backward.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .config import TrainSettings
from .methods import Method

if TYPE_CHECKING:  # annotations only
    from ..activation import RefreshSchedule

__all__ = ["IGNORE", "encode", "collate", "batches", "SafetySet", "TrainConfig", "TrainResult", "train",
           "seq_logps", "reference_logps", "lm_loss", "refresh_schedule", "refresh_forwards_per_step"]

IGNORE = -100


# -- encoding ---------------------------------------------------------------------------------------------
def encode(tok: Any, prompt: str, response: str, *, max_length: int, chat_pair: Callable) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` of one chat exchange; labels -100 on the prompt (loss on the response only)."""
    prompt_text, full_text = chat_pair(tok, prompt, response)
    ids = tok(full_text, add_special_tokens=False)["input_ids"]
    n_prompt = len(tok(prompt_text, add_special_tokens=False)["input_ids"])
    if ids[:n_prompt] != tok(prompt_text, add_special_tokens=False)["input_ids"]:
        # a tokenizer that merges across the prompt/response boundary: find the longest common prefix
        p = tok(prompt_text, add_special_tokens=False)["input_ids"]
        n_prompt = next((i for i, (a, b) in enumerate(zip(ids, p)) if a != b), min(len(ids), len(p)))
    ids = ids[:max_length]
    labels = [IGNORE] * min(n_prompt, len(ids)) + ids[n_prompt:]
    return {"input_ids": ids, "labels": labels[:len(ids)]}


def collate(rows: Sequence[dict[str, list[int]]], pad_id: int, device: Any) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` tensors on ``device``."""
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        labels[i, :k] = torch.tensor(r["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def batches(rows: Sequence[dict[str, list[int]]], batch_size: int, pad_id: int, device: Any) -> list[dict[str, torch.Tensor]]:
    """``rows`` in order, in collated batches."""
    return [collate(rows[i:i + batch_size], pad_id, device) for i in range(0, len(rows), batch_size)]


# -- losses -----------------------------------------------------------------------------------------------
def lm_loss(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the labelled (response) tokens, next-token shifted."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    labels = b["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE)


def seq_logps(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B]`` sum of the log-probabilities of each sequence's labelled tokens."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
    labels = b["labels"][:, 1:]
    mask = labels != IGNORE
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


def kl_to_base(model: torch.nn.Module, base: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over answer positions of KL(model || base) of the next-token distributions."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
    with torch.no_grad():
        ref = base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
    mask = b["labels"][:, 1:] != IGNORE
    logp, logq = torch.log_softmax(logits[mask], -1), torch.log_softmax(ref[mask], -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


@torch.no_grad()
def reference_logps(base: torch.nn.Module, rows: Sequence[dict[str, list[int]]], batch_size: int, pad_id: int,
                    device: Any) -> torch.Tensor:
    """``[N]`` log-probabilities of each row's response under the frozen base (DPO reference, computed once)."""
    was = base.training
    base.eval()
    out = [seq_logps(base, b) for b in batches(rows, batch_size, pad_id, device)]
    base.train(was)
    return torch.cat(out).detach()


# -- one run ----------------------------------------------------------------------------------------------
@dataclass
class SafetySet:
    """The safety train data of one split: SFT rows, or DPO chosen/rejected rows with reference log-probs."""

    chosen: list[dict[str, list[int]]]
    rejected: list[dict[str, list[int]]] | None = None
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    #: DPO: ``[N]`` bool, rows whose loss is the mean token NLL of ``chosen`` (their rejected side unused)
    nll_rows: torch.Tensor | None = None


@dataclass
class TrainConfig(TrainSettings):
    """One run: the study's :class:`~atax_kernels.study.config.TrainSettings` plus this run's objective,
    learning rate, seed and place among the data-parallel ranks."""

    objective: str = "sft"
    lr: float = 1e-5
    seed: int = 0
    rank: int = 0
    world_size: int = 1


@dataclass
class TrainResult:
    """What one training run measured (times, extra passes, losses, projection statistics, notes)."""

    steps: int
    seconds: float                      # training loop, refreshes included (not the initial basis build)
    seconds_per_step: float             # mean step time without the refreshes
    refresh_seconds_per_step: float     # refresh forwards + eigensolves, amortised per step
    setup_seconds: float                # the initial basis build (activation methods), else 0
    extra_forward: float                # extra forward passes per step (units of one training batch)
    extra_backward: float
    loss_first: float
    loss_last: float
    removed_fraction: float | None = None
    basis_mib: float | None = None
    rank_mean: float | None = None
    refreshes: int | None = 0           # bases rebuilt (eigensolves) during training; None: not counted (TRL)
    refresh_checks: int | None = 0      # refresh steps (forwards observed), rebuilt or not
    notes: list[str] = field(default_factory=list)


def block_modules(model: torch.nn.Module, which: str) -> list[str] | None:
    """Names of the supported linear layers under attention (``"attn"``: a path component containing ``attn``)
    or MLP (``"mlp"``) blocks; ``None`` for ``"all"`` (every supported module). LoRA's inner A/B layers are
    not listed (their LoRA layer is)."""
    from ..activation.discovery import module_kind

    if which == "all":
        return None
    names = [n for n, m in model.named_modules()
             if module_kind(m) in ("linear", "conv1d", "lora") and ".lora_" not in n and "base_layer" not in n
             and any(which in part for part in n.split("."))]
    if not names:
        raise ValueError(f"mods={which}: no linear layer of the model sits under a module whose name contains "
                         f"{which!r}")
    return names


def refresh_schedule(cfg: TrainConfig, params: dict[str, Any]) -> "RefreshSchedule":
    """The study's refresh schedule for one method: every ``--refresh-every`` steps, drift-checked with
    ``--refresh-tol`` when it is > 0 — except for a contrast basis (``c`` > 0), which is not a capability-energy
    basis ``update_if_drifted`` can judge, so it keeps the fixed interval."""
    from ..activation import RefreshSchedule

    drift_checked = cfg.refresh_tol > 0 and not float(params.get("c", 0.0))
    return RefreshSchedule(cfg.refresh_every, cfg.refresh_tol if drift_checked else None)


def refresh_forwards_per_step(n_batches: int, schedule: "RefreshSchedule", cfg: TrainConfig) -> float:
    """Extra forward passes per step (in training batches) of the refreshes: a fixed interval's steady-state
    rate (as earlier rows report it); a drift-checked schedule's, from the checks this run made."""
    if schedule.adaptive:
        return n_batches * schedule.checks / max(1, cfg.steps)
    return n_batches / cfg.refresh_every


class _Stream:
    """Random batches of a row list (indices from one generator, so a run is a function of its seed)."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator):
        self.n, self.bs, self.gen = n, min(batch_size, n), gen

    def next(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=self.gen)[:self.bs]


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train(model: torch.nn.Module, base: torch.nn.Module, method: Method, safety: SafetySet,
          retain: Sequence[dict[str, list[int]]], cfg: TrainConfig, *, pad_id: int,
          forward_model: torch.nn.Module | None = None, progress: Any = None) -> TrainResult:
    """Safety-tune ``model`` in place with ``method``; ``base`` is the frozen base (KL, DPO reference).

    ``forward_model``: the module the training forwards go through (a DDP wrapper of ``model``), default
    ``model``. ``progress``: a tqdm bar advanced once per step.
    """
    from ..activation import ActivationSubspace
    from ..activation.schedule import refresh_if_due
    from ..optim import ProjectedOptimizer

    if method.kind == "interp":
        raise ValueError("interp does not train: it is made from the plain run's weights")
    if cfg.objective not in ("sft", "dpo"):
        raise ValueError(f"objective must be 'sft' or 'dpo', got {cfg.objective!r}")
    if cfg.objective == "dpo" and (safety.rejected is None or safety.ref_chosen is None):
        raise ValueError("the dpo objective needs rejected rows and reference log-probs")
    fwd = forward_model if forward_model is not None else model
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(1_000_003 * cfg.seed + 7919 * cfg.rank + 11)
    saf = _Stream(len(safety.chosen), cfg.batch_size, gen)
    ret = _Stream(len(retain), cfg.batch_size, gen)
    kind, p = method.kind, dict(method.params)
    w = float(p.get("w", 0.0))
    params = _trainable(model)
    inner = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sub = None
    setup = 0.0
    notes: list[str] = []
    basis_loader: list[dict[str, torch.Tensor]] = []
    positions = str(p.get("pos", "all"))

    def safety_batch(idx: torch.Tensor) -> dict[str, torch.Tensor]:
        c = collate([safety.chosen[i] for i in idx.tolist()], pad_id, device)
        if cfg.objective == "sft":
            return c
        r = collate([safety.rejected[i] for i in idx.tolist()], pad_id, device)
        # one forward over chosen and rejected together (padded to one length)
        n = max(c["input_ids"].shape[1], r["input_ids"].shape[1])

        def pad(t: torch.Tensor, v: int) -> torch.Tensor:
            return F.pad(t, (0, n - t.shape[1]), value=v)

        return {"input_ids": torch.cat([pad(c["input_ids"], pad_id), pad(r["input_ids"], pad_id)]),
                "attention_mask": torch.cat([pad(c["attention_mask"], 0), pad(r["attention_mask"], 0)]),
                "labels": torch.cat([pad(c["labels"], IGNORE), pad(r["labels"], IGNORE)])}

    def safety_loss(idx: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        if cfg.objective == "sft":
            return lm_loss(fwd, b)
        lp = seq_logps(fwd, b)
        k = idx.shape[0]
        ref_c = safety.ref_chosen[idx].to(device)
        ref_r = safety.ref_rejected[idx].to(device)
        margin = (lp[:k] - ref_c) - (lp[k:] - ref_r)
        per_row = -F.logsigmoid(cfg.beta * margin)
        if safety.nll_rows is not None:
            nll = safety.nll_rows[idx].to(device)
            tokens = (b["labels"][:k, 1:] != IGNORE).sum(-1).clamp(min=1)
            per_row = torch.where(nll, -lp[:k] / tokens, per_row)
        return per_row.mean()

    def retain_batch() -> dict[str, torch.Tensor]:
        return collate([retain[i] for i in ret.next().tolist()], pad_id, device)

    if kind in ("act", "act+ptx"):
        t0 = time.perf_counter()
        order = torch.randperm(len(retain), generator=torch.Generator().manual_seed(cfg.seed + 101)).tolist()
        rows = [retain[i] for i in order[:cfg.basis_batches * cfg.batch_size]]
        basis_loader = batches(rows, cfg.batch_size, pad_id, device)
        sub = ActivationSubspace(model, energy=float(p["e"]), contrast=float(p["c"]),
                                 modules=block_modules(model, str(p.get("mods", "all"))))
        if p["c"]:
            # contrast bases need safety moments from the first update on: one no-grad safety forward
            was = model.training
            model.eval()
            with torch.no_grad():
                b = safety_batch(torch.randperm(len(safety.chosen), generator=torch.Generator().manual_seed(cfg.seed + 202))[:saf.bs])
                with sub.observe(side="safety", attention_mask=b["attention_mask"]):
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            model.train(was)
        sub.observe_loader(basis_loader, positions=positions)
        sub.update()
        setup = time.perf_counter() - t0
    if kind == "grad":
        opt = ProjectedOptimizer(inner, mode=str(p["mode"]), reference="live", backend=cfg.backend)
    elif kind == "act":
        opt = ProjectedOptimizer(inner, activation_subspace=sub, backend=cfg.backend)
    elif kind == "act+ptx":
        opt = ProjectedOptimizer(inner, activation_subspace=sub, ptx_weight=w, backend=cfg.backend)
    else:
        opt = inner

    model.train()
    losses: list[torch.Tensor] = []
    removed: list[torch.Tensor] = []
    step_times: list[float] = []
    refresh_total = 0.0
    schedule = refresh_schedule(cfg, p)
    if cfg.refresh_tol > 0 and kind in ("act", "act+ptx") and not schedule.adaptive:
        notes.append("--refresh-tol not applied: a contrast basis is rebuilt at every refresh step")

    def rebuild(tol: float | None) -> bool:
        sub.observe_loader(basis_loader, positions=positions)
        if tol is not None:
            return sub.update_if_drifted(tol)
        sub.update()
        return True

    t_start = time.perf_counter()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if kind in ("grad", "act+ptx"):
            # the retain gradient first: captured (moved aside) as the reference / the PTX term
            lm_loss(fwd, retain_batch()).backward()
            opt.capture_reference()
        idx = saf.next()
        sb = safety_batch(idx)
        observe = (sub.observe(side="safety", attention_mask=sb["attention_mask"]) if sub is not None and p.get("c")
                   else contextlib.nullcontext())
        with observe:
            loss = safety_loss(idx, sb)
        loss.backward()
        losses.append(loss.detach())
        if kind == "ptx":
            (w * lm_loss(fwd, retain_batch())).backward()
        elif kind == "kl":
            (w * kl_to_base(fwd, base, retain_batch())).backward()
        t_refresh = 0.0
        if sub is not None:
            # after the safety forward (contrast moments) and the backward (LoRA A may be edited by update());
            # the same basis batches each time, so a check measures the model's drift, not sampling noise
            t1 = time.perf_counter()
            if refresh_if_due(schedule, step, rebuild, at_start=False) is not None:
                t_refresh = time.perf_counter() - t1
                refresh_total += t_refresh
        opt.step()
        stats = getattr(opt, "last_stats", None)
        if stats is not None:
            act = getattr(stats, "activation", None)
            if act is not None and kind in ("act", "act+ptx"):
                removed.append(act.update_removed_fraction.detach())
            elif kind == "grad":
                removed.append(stats.removed_fraction.detach())
        step_times.append(time.perf_counter() - t0 - t_refresh)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
    seconds = time.perf_counter() - t_start
    opt.zero_grad(set_to_none=True)
    # the first step pays one-time costs (allocator, kernel warm-up): report the mean of the others
    timed = step_times[1:] if len(step_times) > 1 else step_times
    ref_batches = len(basis_loader)
    if kind == "plain":
        xf, xb = 0.0, 0.0
    elif kind in ("ptx", "grad"):
        xf, xb = 1.0, 1.0
    elif kind == "kl":
        xf, xb = 2.0, 1.0
    else:
        # fixed interval: the steady-state rate (as earlier rows); adaptive: the checks this run made
        xf = refresh_forwards_per_step(ref_batches, schedule, cfg) + (1.0 if kind == "act+ptx" else 0.0)
        xb = 1.0 if kind == "act+ptx" else 0.0
    if cfg.objective == "dpo":
        notes.append("dpo: one safety batch = chosen + rejected; the reference log-probs are precomputed once")
    res = TrainResult(
        steps=cfg.steps, seconds=seconds, seconds_per_step=sum(timed) / max(1, len(timed)),
        refresh_seconds_per_step=refresh_total / max(1, cfg.steps), setup_seconds=setup,
        extra_forward=xf, extra_backward=xb,
        loss_first=float(losses[0]) if losses else float("nan"),
        loss_last=float(losses[-1]) if losses else float("nan"),
        removed_fraction=float(torch.stack(removed).double().mean()) if removed else None,
        refreshes=schedule.refreshes, refresh_checks=schedule.checks, notes=notes)
    if sub is not None:
        res.basis_mib = sub.memory_bytes() / 2**20
        r = [v for k, v in sub.ranks().items() if not k.endswith(".lora_B")]
        res.rank_mean = sum(r) / max(1, len(r))
    return res


# -- DPO through TRL's DPOTrainer (plain / grad / act), the projection attached with atax_kernels.hf.attach ----
TRL_METHODS = ("plain", "grad", "act")


def train_trl(model: torch.nn.Module, base: torch.nn.Module, method: Method, prefs: Sequence[tuple[str, str, str]],
              retain: Sequence[dict[str, list[int]]], cfg: TrainConfig, *, tok: Any, max_length: int,
              progress: Any = None) -> TrainResult:
    """DPO with ``trl.DPOTrainer`` (the base as ``ref_model``; conversational prompt/chosen/rejected rows, so TRL
    applies the chat template), the mitigation attached as a user would: ``grad`` = ``attach(trainer,
    reference=retain_batches)``, ``act`` = ``attach(trainer, reference=ActivationSubspace.from_loader(...),
    refresh_every=...)``. Only these two and ``plain``: PTX / KL / act+ptx need a loss TRL's DPO does not have.
    Step times come from a callback (the reference forward of TRL is part of every step)."""
    import tempfile

    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from ..activation import ActivationSubspace
    from ..integrations.hf import attach

    if method.kind not in TRL_METHODS:
        raise ValueError(f"--dpo-impl trl runs {', '.join(TRL_METHODS)} only, not {method.name!r}")
    p = dict(method.params)
    device = next(model.parameters()).device
    ds = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}]} for q, c, r in prefs])
    order = torch.randperm(len(retain), generator=torch.Generator().manual_seed(cfg.seed + 101)).tolist()
    ref_batches = batches([retain[i] for i in order], cfg.batch_size, tok.pad_token_id, device)
    times: list[float] = []
    losses: list[float] = []

    class _Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)
            if progress is not None:
                progress.update(1)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    setup = 0.0
    with tempfile.TemporaryDirectory() as out:
        dt = next(model.parameters()).dtype
        args = DPOConfig(
            output_dir=out, per_device_train_batch_size=cfg.batch_size, max_steps=cfg.steps, learning_rate=cfg.lr,
            weight_decay=cfg.weight_decay, beta=cfg.beta, lr_scheduler_type="constant", warmup_steps=0,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=device.type == "cpu",
            bf16=dt == torch.bfloat16, max_length=max_length, disable_tqdm=True, seed=cfg.seed,
            dataloader_num_workers=0, optim="adamw_torch", gradient_checkpointing=False)
        # TRL prepares its ref_model in place (the forward of a prepared model can end up wrapped for inference,
        # and a later deepcopy of the base would inherit it): give it a copy of its own
        ref_model = copy.deepcopy(base)
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=[_Clock()])
        sub = schedule = None
        if method.kind == "grad":
            handle = attach(trainer, reference=ref_batches, mode=str(p["mode"]), backend=cfg.backend)
        elif method.kind == "act":
            t0 = time.perf_counter()
            sub = ActivationSubspace.from_loader(model, ref_batches[:cfg.basis_batches], energy=float(p["e"]),
                                                 contrast=float(p["c"]), positions=str(p["pos"]))
            setup = time.perf_counter() - t0
            schedule = refresh_schedule(cfg, p)   # the study loop's, through attach as a user would give it
            handle = attach(trainer, reference=sub, refresh_every=schedule, backend=cfg.backend)
        else:
            handle = None
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        removed = None
        if handle is not None:
            hist = [e for e in trainer.state.log_history
                    if "atax/removed_fraction" in e or "atax/update_removed_fraction" in e]
            vals = [e.get("atax/removed_fraction", e.get("atax/update_removed_fraction")) for e in hist]
            vals = [v for v in vals if v is not None]
            removed = sum(vals) / len(vals) if vals else None
            handle.detach()
    timed = times[1:] if len(times) > 1 else times
    n_ref = min(cfg.basis_batches, len(ref_batches))
    act_forwards = refresh_forwards_per_step(n_ref, schedule, cfg) if schedule is not None else 0.0
    xf, xb = {"plain": (0.0, 0.0), "grad": (1.0, 1.0), "act": (act_forwards, 0.0)}[method.kind]
    res = TrainResult(steps=cfg.steps, seconds=seconds, seconds_per_step=sum(timed) / max(1, len(timed)),
                      refresh_seconds_per_step=0.0, setup_seconds=setup, extra_forward=xf, extra_backward=xb,
                      loss_first=losses[0] if losses else float("nan"),
                      loss_last=losses[-1] if losses else float("nan"), removed_fraction=removed,
                      refreshes=None if schedule is None else schedule.refreshes,
                      refresh_checks=None if schedule is None else schedule.checks,
                      notes=["trl DPOTrainer (reference forward every step, inside s/step); activation refreshes "
                             "inside s/step"])
    if sub is not None:
        res.basis_mib = sub.memory_bytes() / 2**20
        r = [v for k, v in sub.ranks().items() if not k.endswith(".lora_B")]
        res.rank_mean = sum(r) / max(1, len(r))
    return res
