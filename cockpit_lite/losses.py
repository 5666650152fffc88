"""Per-sample losses from any ``torch.nn`` loss module, derived by the cockpit, never passed in.

For unreduced element losses u (shape B x ...), ``reduction="sum"`` gives L = sum_i l_i with
l_i = sum(u_i). ``reduction="mean"`` gives L = sum(u) / N, where N is the number of elements (or, for
CrossEntropyLoss/NLLLoss with class weights or ignored targets, the summed weight of the counted
targets). We define l_i = B * sum(u_i) / N, so that L = (1/B) sum_i l_i exactly and the mini-batch
gradient is the mean of the per-sample gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cockpit_lite.compat import cpu_value, nll_terms, nll_total_weight, without_grad

SUPPORTED_REDUCTIONS = ("mean", "sum")


def check_loss(loss_fn: object) -> None:
    """``loss_fn`` may be None, a loss module (checked by :func:`check_loss_module`) or a callable that
    returns per-sample losses."""
    if callable(loss_fn) and getattr(loss_fn, "__module__", "") == "torch.nn.functional":
        raise TypeError(
            f"loss_fn={loss_fn.__name__} is a functional loss: the cockpit sees a functional loss without being "
            "given it (leave loss_fn out), or give the module form with the same arguments (nn.CrossEntropyLoss()) "
            "to have per-sample losses"
        )
    if loss_fn is None or (callable(loss_fn) and not isinstance(loss_fn, nn.Module)):
        return
    check_loss_module(loss_fn)


def fold_rows(per_row: torch.Tensor, batch: int, reduction: str) -> torch.Tensor | None:
    """Per-row losses of a loss module (rows = examples, or the B x m tokens of B sequences flattened
    with ``view(-1, V)``) as per-example losses: sequence i's share of the loss, its m rows summed
    (divided by m for a mean, so that the batch loss stays mean_i l_i). None if the rows do not split."""
    n = per_row.shape[0]
    if n == batch:
        return per_row
    if batch <= 0 or n % batch:
        return None
    folded = per_row.reshape(batch, n // batch).sum(1)
    return folded / (n // batch) if reduction == "mean" else folded


def rows_to_examples(per_row: torch.Tensor, examples: torch.Tensor, batch: int, reduction: str) -> torch.Tensor | None:
    """Per-row losses of a loss over selected rows of the model's output (``examples``: the example each selected
    row belongs to, :func:`cockpit_lite.model_io.selected_rows`) as the batch's (batch,): rows split further in
    order (a selected sequence's tokens) folded to them first (:func:`fold_rows` with ``reduction``), then each
    example's rows added, 0 for one left out. None where the rows do not fold to the selection."""
    index = examples.to(per_row.device)
    own = fold_rows(per_row, len(index), reduction)
    return per_row.new_zeros(batch).index_add_(0, index, own) if own is not None else None


def _find(output: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
        if value is not None:
            return value
    return None


def scalar_loss(output: Any) -> torch.Tensor | None:
    """The loss a model returned: ``output.loss`` (Hugging Face), a 0-dim tensor output, or the 0-dim
    element of a tuple output such as nanoGPT's ``(logits, loss)``."""
    if torch.is_tensor(output):
        return output if output.dim() == 0 else None
    found = _find(output, ("loss",))
    if torch.is_tensor(found) and found.dim() == 0:
        return found
    if isinstance(output, (tuple, list)):
        return next((t for t in output if torch.is_tensor(t) and t.dim() == 0), None)
    return None


@dataclass
class DerivedLosses:
    """Candidate per-example losses of a model that computes its own cross-entropy loss, one row per
    convention (:func:`derived_losses`), and whether each reproduces the loss the model returned: chosen
    once their values are on the host (:meth:`choose`), so the forward never waits for the device."""

    keys: tuple[tuple, ...]  #: (shift, ignore_index, normaliser) of each row
    rows: torch.Tensor  #: (K, B): l_i under each convention, with L = mean_i l_i
    ok: torch.Tensor  #: (K,): 1 where the row's mean reproduces the returned loss, else 0
    want: torch.Tensor  #: the loss the model returned (0-dim, float32)

    def add(self, key: tuple, per_example: torch.Tensor) -> DerivedLosses:
        """These candidates and one more (``per_example``, with L = mean_i l_i if it is right), last."""
        ok = _reproduces(per_example.float().sum() / len(per_example), self.want)
        return DerivedLosses(
            (*self.keys, key),
            torch.cat([self.rows, per_example.to(self.rows.dtype).unsqueeze(0)]),
            torch.cat([self.ok, ok.float().unsqueeze(0)]),
            self.want,
        )

    def choose(self, rows: Any, ok: Any) -> tuple[tuple, Any] | None:
        """(key, l_i) of the first convention that reproduces the loss, from the host values of
        :attr:`rows` and :attr:`ok`; None if none does."""
        for k, key in enumerate(self.keys):
            if ok[k] > 0.5:
                return key, rows[k]
        return None


@without_grad
def derived_losses(
    output: Any, args: tuple, kwargs: Mapping[str, Any], batch: int, conventions: tuple[tuple, ...] | None = None
) -> DerivedLosses | None:
    """Per-example losses l_i of a model that computes its own cross-entropy loss (Hugging Face heads
    given ``labels``, nanoGPT's ``forward(idx, targets)``), with L = mean_i l_i for the loss L it
    returned, as candidates: a convention counts only if it reproduces L exactly (to float32 round-off),
    which :meth:`DerivedLosses.choose` checks on the host values (no synchronisation here). None if the
    output holds no logits and integer targets of the batch.

    Candidates: token cross-entropy of logits (B, T, V) against targets (B, T), next-token (shifted by
    one) or not, ignoring -100 or -1, normalised by the counted tokens or by ``num_items_in_batch``;
    sequence classification, logits (B, C) against labels (B,). l_i = B x (sum of example i's token
    losses) / normaliser: each sequence's share of the loss, never per-token values. A convention whose
    targets hold other negative values is computed on them masked and never matches. ``conventions``:
    only these keys (the one that matched before: one cross-entropy instead of up to four)."""
    loss = scalar_loss(output)
    if loss is None or batch is None:
        return None
    logits = _find(output, ("logits",))
    if logits is None and isinstance(output, (tuple, list)):
        logits = next((t for t in output if torch.is_tensor(t) and t.dim() >= 2 and t.shape[0] == batch), None)
    targets = _find(kwargs, ("labels", "targets"))
    if targets is None and len(args) >= 2 and torch.is_tensor(args[1]):
        targets = args[1]
    if not (torch.is_tensor(logits) and torch.is_tensor(targets)) or torch.is_floating_point(targets):
        return None
    if logits.shape[0] != batch or targets.shape[0] != batch:
        return None
    want = loss.detach().float()
    logits, targets = logits.detach().float(), targets.detach()
    items = kwargs.get("num_items_in_batch")
    if torch.is_tensor(items):
        items = items.detach().float()
    elif items is not None:
        items = float(items)
    shapes: list[tuple[tuple, torch.Tensor, torch.Tensor]] = []  # (shift, ignore), logits, targets
    if logits.dim() == 3 and targets.dim() == 2:
        for shift in (0, 1):
            lg = logits[:, :-1] if shift else logits
            tg = targets[:, 1:] if shift else targets
            if lg.shape[1] == tg.shape[1]:
                shapes += [((shift, ignore), lg, tg) for ignore in (-100, -1)]
    elif logits.dim() == 2 and targets.dim() == 1:
        shapes.append((("classes", -100), logits, targets))
    keys, rows, oks = [], [], []
    for (kind, ignore), lg, tg in shapes:
        wanted = [n for n in ("count", "items") if conventions is None or (kind, ignore, n) in conventions]
        if not wanted:
            continue
        other = (tg < 0) & (tg != ignore)  # other negative targets: not this convention (masked, never matched)
        ce = F.cross_entropy(
            lg.transpose(1, 2) if lg.dim() == 3 else lg,
            tg.masked_fill(other, ignore),
            ignore_index=ignore,
            reduction="none",
        )
        per_example = ce.reshape(batch, -1).sum(1)
        valid = ~other.any()
        for norm in wanted:
            n = (tg != ignore).sum().float() if norm == "count" else items
            if n is None or (not torch.is_tensor(n) and n <= 0):
                continue
            got = per_example.sum() / n
            keys.append((kind, ignore, norm))
            rows.append(per_example.mul(batch).div(n))  # (n: a count on the device, or a number)
            oks.append(valid & _reproduces(got, want) & (n > 0 if torch.is_tensor(n) else True))
    if not keys:
        return None
    return DerivedLosses(tuple(keys), torch.stack(rows), torch.stack(oks).float(), want)


def _reproduces(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Whether ``got`` is ``want`` to float32 round-off, or both are NaN (every target ignored: the loss
    is 0/0, and so is every l_i); a 0-dim bool tensor: nothing is read."""
    return ((got - want).abs() <= 1e-5 * want.abs().clamp(min=1e-6) + 1e-7) | (got.isnan() & want.isnan())


def check_loss_module(loss_fn: object) -> None:
    """Raise a clear error for a loss the cockpit cannot read per-sample losses from."""
    if not isinstance(loss_fn, nn.Module):
        raise TypeError(
            f"loss_fn must be a torch.nn loss module (e.g. nn.CrossEntropyLoss()), got {type(loss_fn).__name__}. "
            "Functional losses (F.cross_entropy) cannot be hooked: use the module form with the same arguments."
        )
    reduction = getattr(loss_fn, "reduction", None)
    if reduction is None:
        raise TypeError(
            f"{type(loss_fn).__name__} has no 'reduction' attribute: the cockpit needs a loss module with "
            "reduction='mean' or 'sum' to derive per-sample losses."
        )
    if reduction not in SUPPORTED_REDUCTIONS and not (reduction == "batchmean" and isinstance(loss_fn, nn.KLDivLoss)):
        raise ValueError(
            f"{type(loss_fn).__name__}(reduction={reduction!r}) is not supported: the training loop must "
            "reduce the loss itself, so the cockpit cannot know the scale of the gradient. Use "
            "reduction='mean' (or 'sum') in the loss module and let the module reduce."
        )


def reduction_of(loss_fn: nn.Module) -> str:
    """How a loss module reduces over examples: ``"mean"`` or ``"sum"``. ``KLDivLoss(reduction="batchmean")``
    (the sum of all elements over B: the mean over examples of each example's sum) is a mean."""
    return "mean" if loss_fn.reduction == "batchmean" else loss_fn.reduction


def unreduced(loss_fn: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The loss module's element losses u (reduction="none") for these inputs; the module's own
    reduction is restored afterwards. Differentiable: callers detach or not."""
    if type(loss_fn) is nn.CrossEntropyLoss and len(args) == 2 and not kwargs:  # its forward, unreduced
        return F.cross_entropy(
            args[0], args[1], weight=loss_fn.weight, ignore_index=loss_fn.ignore_index, reduction="none",
            label_smoothing=loss_fn.label_smoothing,
        )  # fmt: skip
    reduction = loss_fn.reduction
    loss_fn.reduction = "none"
    try:
        return loss_fn.forward(*args, **kwargs)
    finally:
        loss_fn.reduction = reduction


def target_weights(loss_fn: nn.Module, target: Any, dtype: torch.dtype) -> torch.Tensor | None:
    """CrossEntropyLoss/NLLLoss with class-index targets: the weight each target element counts with
    in reduction="mean" (its class weight, 0 for ``ignore_index``); None for every other loss."""
    if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) or not torch.is_tensor(target):
        return None
    if torch.is_floating_point(target):  # class probabilities: a plain mean
        return None
    w = (target != loss_fn.ignore_index).to(dtype)
    if loss_fn.weight is not None:
        w = w * loss_fn.weight[target.clamp(min=0)]
    return w


_NLL_MODULES = (nn.CrossEntropyLoss, nn.NLLLoss)


@without_grad
def per_sample_losses(
    loss_fn: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor | None = None
) -> torch.Tensor:
    """l_i for the batch the loss module was just called on (shape B), with L = mean_i l_i for
    reduction="mean" (l_i = B sum(u_i) / N, N the element count or the summed target weights).
    ``output``: the loss the module returned; for a cross-entropy / NLL loss N is then read from its
    backward node (:func:`~cockpit_lite.compat.nll_total_weight`) instead of counted again; for a large
    prediction the log-probabilities are read from that node too (:func:`nll_losses`), not computed again."""
    saved = _saved_nll(loss_fn, args, kwargs, output)
    if saved is not None:
        return saved
    detached = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
    u = unreduced(loss_fn, *detached, **kwargs)
    batch = u.shape[0] if u.dim() > 0 else 1
    per_sample = u if u.dim() == 1 else u.reshape(batch, -1).sum(dim=1)
    if loss_fn.reduction == "mean":  # (batchmean: L = sum(u) / B is already the mean of the sums)
        total = nll_total_weight(output) if output is not None and type(loss_fn) in _NLL_MODULES else None
        if total is not None:
            if total.is_cpu:  # (a host number: one scaling op, none when N = B)
                n = cpu_value(total)
                if n == batch:
                    return per_sample
                return per_sample * (batch / n if n else math.nan)  # (no target counted: the loss is 0/0)
            return per_sample.mul(batch).div_(total)  # (on a GPU: read on the device, never on the host)
        target = detached[1] if len(detached) >= 2 else None
        if (
            type(loss_fn) in _NLL_MODULES
            and loss_fn.weight is None
            and torch.is_tensor(target)
            and not torch.is_floating_point(target)
        ):  # class indices without class weights: N counts the targets that are not ignore_index
            return per_sample.mul(batch).div_((target != loss_fn.ignore_index).sum())
        w = target_weights(loss_fn, target, u.dtype) if target is not None else None
        return per_sample.mul(batch).div_(w.sum()) if w is not None else per_sample * (batch / u.numel())
    return per_sample


#: predictions of at least this many elements take their per-row losses from the log-probabilities autograd saved
#: (one gather) rather than from a second log-softmax over them; smaller ones recompute (fewer, cheaper ops)
SAVED_NLL_ELEMENTS = 1 << 16


def _saved_nll(loss_fn: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor | None) -> torch.Tensor | None:
    """The per-row losses of a CrossEntropyLoss / NLLLoss module call (no label smoothing) from its backward
    node's saved log-probabilities and targets, where the prediction is large; else None."""
    if (
        output is None
        or kwargs
        or len(args) != 2
        or type(loss_fn) not in _NLL_MODULES
        or getattr(loss_fn, "label_smoothing", 0.0)
        or not torch.is_tensor(args[0])
        or args[0].numel() < SAVED_NLL_ELEMENTS
        or args[0].dim() < 1
    ):
        return None
    terms = nll_terms(output.grad_fn) if output.grad_fn is not None else None
    if terms is None:  # (no graph: a call under no_grad, or on detached inputs)
        return None
    # (the node may hold views of them: (B, C, 1, T) and (B, 1, T) for a (B, C, T) prediction)
    logp, target = terms[0], terms[1]
    y = args[1]
    if (
        not torch.is_tensor(y)
        or target.data_ptr() != y.data_ptr()
        or target.numel() != y.numel()
        or logp.numel() != args[0].numel()
        or logp.shape[:2] != args[0].shape[:2]
    ):
        return None
    return nll_losses(terms, int(args[0].shape[0]))


def example_losses(loss_fn: nn.Module, pred: torch.Tensor, target: Any) -> torch.Tensor:
    """l_k = the loss of example k as a batch of one (shape K), from one unreduced evaluation.

    ``reduction="sum"``: l_k = sum(u_k). ``"mean"``: the mean over the example's elements; for
    CrossEntropyLoss/NLLLoss with class-index targets the weighted mean over its counted targets.
    Unlike :func:`per_sample_losses` the examples are not normalised together (TracIn probes).
    """
    u = unreduced(loss_fn, pred, target)
    k = u.shape[0] if u.dim() > 0 else 1
    flat = u.reshape(k, -1)
    if loss_fn.reduction in ("sum", "batchmean"):  # (batchmean: a batch of one sums its elements)
        return flat.sum(1)
    w = target_weights(loss_fn, target, u.dtype)
    if w is not None:
        return flat.sum(1) / w.reshape(k, -1).sum(1).clamp(min=torch.finfo(u.dtype).tiny)
    return flat.mean(1)


def gradient_scale(reduction: str, batch_size: int) -> float:
    """c in p.grad = c * sum_i g_i."""
    return 1.0 / batch_size if reduction == "mean" else 1.0


@without_grad
def nll_losses(terms: tuple, batch: int, rows: torch.Tensor | None = None) -> torch.Tensor | None:
    """Per-example losses of a cross-entropy / NLL loss from its saved inputs (compat.nll_terms): the
    element losses -w[y] log p[y] (0 where y is ignore_index) summed per example (rows of a loss over
    flattened tokens folded to their sequences), normalised as the loss was (l_i = B s_i / sum of the
    counted weights for a mean, s_i for a sum), so that L = mean_i l_i (sum_i l_i); every target ignored:
    the loss is 0/0, and so is every l_i (NaN), as for a loss module. ``rows``: where the prediction selected
    rows of the model's output (``out[mask]``, ``out[idx]``), the example of each selected row
    (:func:`~cockpit_lite.model_io.selected_rows`): each row's loss goes to its example (0 for one left out)
    instead of the rows being folded."""
    logp, target, weight, ignore, reduction = terms
    if reduction not in (1, 2) or logp.dim() < 1 or target.dtype not in (torch.int64, torch.int32):
        return None
    tgt = target.long()
    keep = tgt != ignore
    picked = -logp.gather(1, tgt.clamp(min=0).unsqueeze(1)).squeeze(1)
    w = keep.to(logp.dtype) if weight is None else weight[tgt.clamp(min=0)] * keep
    elem = (picked * w).reshape(picked.shape[0], -1).sum(1)
    if rows is not None:
        per_example = rows_to_examples(elem, rows, batch, "sum")
    else:
        per_example = fold_rows(elem, batch, "sum")
    if per_example is None:
        return None
    if reduction == 2:
        return per_example
    # (on the device: no synchronisation; no target counted: the loss is 0/0, and so is every l_i)
    return per_example.mul(batch).div_(w.sum())
