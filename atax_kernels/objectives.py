"""Capability objectives for *reference* gradients.

Projecting the safety gradient away from the gradient of the ordinary language-model loss protects
little once the model is good at a task: the cross-entropy of a confident, correct prediction is
saturated (``p ~ 1``), its gradient is tiny and points mostly at the few still-uncertain tokens, so it
does not describe the directions that would *destroy* the capability. The two objectives here stay
informative on a model that already answers correctly:

* :func:`margin_loss`: ``-(correct logit - strongest competing logit)``. Its gradient has the same size
  whether the margin is 1 or 20, and it points exactly at "make the answer lose to its rival".
* :func:`tempered_loss`: cross-entropy of ``logits / T``. A large temperature undoes the saturation
  (the softmax of ``logits / T`` is far from one-hot), and for ``T -> inf`` its gradient approaches the
  gradient of ``(correct logit - mean logit) / T``.

Both take logits and labels that are **already aligned**: ``labels[..., i]`` is the target for
``logits[..., i, :]``. Neither shifts for causal LMs (unlike ``transformers``' built-in loss) — shift
before calling, or build labels as :mod:`atax_kernels.tasks` does (the answer label sits at the last
prompt position, every other position is ``ignore_index``).

How much capability either buys back is an empirical question that depends on the task: the held-out,
multi-seed numbers for both demo tasks are in ``docs/demo-full.md`` (``python -m atax_kernels.demo --full``).
Earlier training-set numbers quoted here did not survive held-out scoring and were removed.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["tempered_loss", "margin_loss"]


def _flatten(logits: torch.Tensor, labels: torch.Tensor, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and flatten ``[..., V]`` logits with ``[...]`` labels into ``[N, V]`` / ``[N]``."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{fn}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{fn}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{fn}: logits must be floating point, got {logits.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{fn}: labels must be an integer tensor, got {labels.dtype}")
    if logits.dim() not in (2, 3):
        raise ValueError(
            f"{fn}: logits must be [N, V] or [B, T, V], got shape {tuple(logits.shape)}"
        )
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{fn}: labels shape {tuple(labels.shape)} does not match logits shape {tuple(logits.shape)} "
            f"(expected labels of shape {tuple(logits.shape[:-1])}; labels are NOT shifted — align them "
            f"with the logits positions before calling)"
        )
    if logits.shape[-1] < 1:
        raise ValueError(f"{fn}: logits have an empty vocabulary dimension (shape {tuple(logits.shape)})")
    if labels.device != logits.device:
        raise ValueError(f"{fn}: labels are on {labels.device} but logits on {logits.device}")
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long()


def _check_label_range(labels: torch.Tensor, keep: torch.Tensor, vocab: int, fn: str) -> None:
    picked = labels[keep]
    if picked.numel() and (bool((picked < 0).any()) or bool((picked >= vocab).any())):
        bad = picked[(picked < 0) | (picked >= vocab)][0].item()
        raise ValueError(f"{fn}: label {bad} is outside the vocabulary [0, {vocab}) and is not ignore_index")


def _empty_loss(logits: torch.Tensor) -> torch.Tensor:
    # A zero that is still connected to the graph: backward() works and yields zero gradients.
    return logits.sum() * 0.0


def tempered_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 30.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cross-entropy of ``logits / temperature``, averaged over non-ignored tokens.

    A non-saturating capability objective for reference gradients: on a model that already answers with
    ``p ~ 1`` the plain cross-entropy gradient vanishes, while the tempered one keeps a useful size and
    points along "raise the answer against *all* other tokens".

    Held-out results of tempered references on the demo tasks: ``docs/demo-full.md``.

    Args:
        logits: ``[N, V]`` or causal-LM ``[B, T, V]`` floating-point logits.
        labels: ``[N]`` or ``[B, T]`` integer targets **aligned with the logits positions** (no shift is
            applied: ``labels[b, t]`` is the target of ``logits[b, t]``). Positions equal to
            ``ignore_index`` are skipped.
        temperature: ``T > 0``. ``T = 1`` is the ordinary cross-entropy.
        ignore_index: label value to skip.

    Returns:
        Scalar loss in the logits' dtype. When every position is ignored it is a zero still attached to
        the graph (``backward()`` gives zero gradients, never NaN).

    Raises:
        TypeError: non-tensor inputs, non-floating logits, non-integer labels.
        ValueError: shape mismatch, ``temperature <= 0`` (or non-finite), labels outside the vocabulary.
    """
    fn = "tempered_loss"
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{fn}: temperature must be a number, got {type(temperature).__name__}")
    if not (temperature > 0) or temperature == float("inf"):
        raise ValueError(f"{fn}: temperature must be a finite number > 0, got {temperature}")
    flat_logits, flat_labels = _flatten(logits, labels, fn)
    keep = flat_labels != ignore_index
    _check_label_range(flat_labels, keep, flat_logits.shape[-1], fn)
    if not bool(keep.any()):
        return _empty_loss(logits)
    return torch.nn.functional.cross_entropy(flat_logits[keep] / float(temperature), flat_labels[keep])


def margin_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    competitor_ids: Sequence[int] | torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Negative logit margin ``-(z[label] - max_{c != label} z[c])``, averaged over non-ignored tokens.

    A non-saturating capability objective for reference gradients: its gradient is ``+1`` on the
    strongest competitor and ``-1`` on the answer whatever the margin's size, i.e. exactly the direction
    in which the capability would be lost.

    With ``competitor_ids`` the competitor is the strongest among those token ids (the label itself is
    excluded when it is one of them; a position whose label is the only candidate contributes 0), e.g. the
    REFUSE token that safety training pushes up. Whether naming it helps depends on the task: measure it.

    Args:
        logits: ``[N, V]`` or causal-LM ``[B, T, V]`` floating-point logits.
        labels: ``[N]`` or ``[B, T]`` integer targets **aligned with the logits positions** — no shift is
            applied (same convention as :func:`tempered_loss`).
        competitor_ids: optional sequence / 1-D integer tensor of candidate competitor token ids.
        ignore_index: label value to skip.

    Returns:
        Scalar loss in the logits' dtype (negative when the model is right). When every position is
        ignored it is a zero still attached to the graph.

    Raises:
        TypeError: non-tensor inputs, non-floating logits, non-integer labels or competitor ids.
        ValueError: shape mismatch, a vocabulary of one token (no competitor), empty ``competitor_ids``,
            ids or labels outside the vocabulary.
    """
    fn = "margin_loss"
    flat_logits, flat_labels = _flatten(logits, labels, fn)
    vocab = flat_logits.shape[-1]
    keep = flat_labels != ignore_index
    _check_label_range(flat_labels, keep, vocab, fn)

    cand = None
    if competitor_ids is not None:
        if isinstance(competitor_ids, torch.Tensor):
            if competitor_ids.is_floating_point() or competitor_ids.is_complex() or competitor_ids.dtype == torch.bool:
                raise TypeError(f"{fn}: competitor_ids must hold integers, got {competitor_ids.dtype}")
            cand = competitor_ids.reshape(-1).to(device=flat_logits.device, dtype=torch.long)
        else:
            ids = list(competitor_ids)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise TypeError(f"{fn}: competitor_ids must be integers, got {ids!r}")
            cand = torch.tensor(ids, dtype=torch.long, device=flat_logits.device)
        if cand.numel() == 0:
            raise ValueError(f"{fn}: competitor_ids is empty")
        if bool((cand < 0).any()) or bool((cand >= vocab).any()):
            raise ValueError(f"{fn}: competitor_ids {cand.tolist()} outside the vocabulary [0, {vocab})")
    elif vocab < 2:
        raise ValueError(f"{fn}: a vocabulary of one token has no competitor (logits shape {tuple(logits.shape)})")

    if not bool(keep.any()):
        return _empty_loss(logits)
    z = flat_logits[keep]
    y = flat_labels[keep]
    correct = z.gather(1, y[:, None]).squeeze(1)
    neg_inf = torch.finfo(z.dtype).min
    if cand is None:
        masked = z.scatter(1, y[:, None], neg_inf)
        rival = masked.amax(dim=1)
        valid = torch.ones_like(correct, dtype=torch.bool)
    else:
        zc = z[:, cand]  # [n, C]
        is_label = cand[None, :] == y[:, None]
        masked = zc.masked_fill(is_label, neg_inf)
        rival = masked.amax(dim=1)
        valid = ~is_label.all(dim=1)
    per_token = torch.where(valid, rival - correct, torch.zeros_like(correct))
    return per_token.sum() / y.numel()
