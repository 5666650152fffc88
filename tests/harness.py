"""One exactness harness for the per-sample engine: the cockpit's split of the gradient into samples,
checked per parameter against a float64 loop over samples with one autograd call each.

A *sample* is an example along the batch axis of the model's input. With the batch loss
L = loss_fn(model(x), y) and p.grad = dL/dp, example i's *share* of p.grad is the backward, through
the batch's own graph, of dL/d(output) restricted to example i's row of the output. The shares add up
to p.grad; the per-sample gradient is

    g_i = B * share_i   for reduction="mean"   (so p.grad = mean_i g_i)
    g_i = share_i       for reduction="sum"    (so p.grad = sum_i g_i)

Each example is also run alone first: its output must equal its row of the batch output, else the
model couples its examples in the forward (train-mode BatchNorm) and the harness refuses it.

A random model (dropout in train mode: two forwards with different seeds differ) is served by replay:
the coupling check runs with every module but the batch-statistics norms in eval mode (dropout off),
and both the cockpit's step and the loop's batch forward draw their masks from the same seed
(``REPLAY_SEED``, inside ``torch.random.fork_rng``), so the loop splits the very step the cockpit saw.
That the masks were the same is checked, not assumed: the loop's shares must add up to the step's
``p.grad`` (float32 and float64 draw the same masks on CPU; a mismatch fails that check).
This needs no per-sample loss formula (weighted means, ignored targets and multi-element losses are
served by the loss module itself) and shares no code with the engine. The cockpit's numbers come only
through the public Instrument API (an instrument asking for ``Need.PER_SAMPLE_SQ_NORMS`` with
``_BY_PARAM``, ``Need.PER_SAMPLE_DOT_MEAN`` and projections onto fixed random directions), and are
compared with

    ||g_ip||^2                      per parameter p          (record.per_sample_sq_norms_by_param)
    ||g_i||^2                       all parameters           (record.per_sample_sq_norms, and again from a
                                                              second step asking for the total alone)
    g_i . gbar, gbar = mean_j g_j   all parameters           (record.per_sample_dot_mean)
    g_ip . v_kp                     per parameter p, k < K   (record.projections, one key per (k, p))
    g_i . v_k                       all parameters, k < K    (record.projections)

within ``rtol`` times the scale of each quantity, max_i |reference_i|, plus the float32 round-off of
the gradients propagated into it: each g_i is taken to carry an error of ``NOISE`` times its whole norm
||g_i|| (about 8 float32 ulps), which matters only where a quantity is far smaller than the gradient
it comes from (a bias followed by a normalisation has g_ip = 0 in exact arithmetic, and float32
round-off in the engine). Where g_i . gbar fails (the record holds only the sum over parameters), the
step is run again once per module, with an optimizer holding only that module's parameters, to name
the parameters at fault.

On a device (``device="cuda"``) the model, loss module, inputs and targets are moved there first and
both the cockpit's step and the float64 loop run on it; the comparison is made on the CPU in float64.
A random model is a CPU case: CUDA's dropout kernels do not promise float64 the masks they drew in
float32 (the add-up check above would fail); tests/test_attention_dropout.py checks CUDA dropout
against float32 shares of the same forward on the same device.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from cockpit_lite.instruments import PerSampleGradNorms
from torch import nn

from cockpit_lite import Cockpit, Instrument, Need, Needs

RTOL = 1e-5
#: the seed both the cockpit's step and the loop's batch forward start from, for a random model
REPLAY_SEED = 1234
#: float32 round-off of a per-sample gradient relative to its norm (unit round-off 6e-8, times 16)
NOISE = 1e-6


@dataclass
class Checked:
    """What :func:`assert_matches_loop` compared: the cockpit's record and the float64 reference."""

    record: Any
    #: {name: (B, *shape)} float64 per-sample gradients g_i from the loop
    reference: dict[str, np.ndarray]
    #: {key: {name: tensor}} the directions projected onto
    directions: dict[str, dict[str, torch.Tensor]]
    warnings: list[str] = field(default_factory=list)


#: what the harness's main step asks for (its second step asks for the squared norms' total alone)
FLAGS = frozenset({Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_SQ_NORMS_BY_PARAM, Need.PER_SAMPLE_DOT_MEAN})


class _Recorder(Instrument):
    """Asks for ``flags`` and projections onto the given directions; keeps the step record."""

    def __init__(self, directions: dict[str, dict[str, torch.Tensor]], flags: frozenset = FLAGS):
        super().__init__(name="exactness")
        self.directions = directions
        self.flags = flags
        self.record = None
        self.grads: dict[str, torch.Tensor] = {}

    def requires(self, step: int) -> Needs:
        dirs = {key: (lambda rec, d=d: d) for key, d in self.directions.items()}
        return Needs(flags=set(self.flags), directions=dirs)

    def on_before_step(self, record) -> None:
        self.grads = {n: p.grad.detach().double().clone() for n, p in record.params.items() if p.grad is not None}

    def compute(self, record):
        self.record = record
        return {}


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor in it (nested tuples, lists and dicts) moved to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def _as_tuple(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _double(t: Any) -> Any:
    return t.double() if torch.is_tensor(t) and torch.is_floating_point(t) else t


def _take(t: Any, i: int, axis: int) -> Any:
    return t.narrow(axis, i, 1) if torch.is_tensor(t) else t


def _seeded(seed: int | None):
    """A context in which the global RNG starts from ``seed`` and is restored after (none for None)."""
    if seed is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng())
    torch.manual_seed(seed)
    return stack


@contextlib.contextmanager
def _randomness_off(model: nn.Module):
    """Every module in eval mode except the norms with batch statistics (whose train mode is the
    coupling the check is for): dropout, functional included (``training=module.training``), is off."""
    from cockpit_lite.compat import BatchNormBase, InstanceNormBase

    before = {m: m.training for m in model.modules()}
    try:
        for m in model.modules():
            if not isinstance(m, (BatchNormBase, InstanceNormBase)):
                m.training = False
        yield
    finally:
        for m, mode in before.items():
            m.training = mode


def is_random(model: nn.Module, inputs: Any) -> bool:
    """Whether two forwards of (a copy of) the model on the same inputs with different seeds differ."""
    m = copy.deepcopy(model)
    args = _as_tuple(inputs)
    with torch.no_grad():
        with _seeded(1):
            a = m(*args)
        with _seeded(2):
            b = m(*args)
    return not torch.equal(a, b)


def shares_loop(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    loss_fn: nn.Module,
    names: Sequence[str],
    batch_axis: int = 0,
    replay_seed: int | None = None,
    rng_seed: int | None = None,
) -> dict[str, np.ndarray]:
    """{name: (B, *shape)} float64 per-sample gradients g_i (module docstring), one autograd call each.
    (``rng_seed`` is another name for ``replay_seed``.)

    First each example is run alone: its output must be the batch output's row (the model does not
    couple its examples in the forward), else AssertionError. Then, on the graph of the batch, example
    i's share of dL/dp is the backward of dL/d(output) restricted to row i. A backward that couples the
    examples (``scale_grad_by_freq`` divides by counts over the whole batch) is part of the share.
    With ``replay_seed`` (a random model) the check runs with dropout off and the batch forward starts
    from that seed (module docstring).
    """
    replay_seed = replay_seed if rng_seed is None else rng_seed
    m = copy.deepcopy(model).double()
    lf = copy.deepcopy(loss_fn).double()
    params = dict(m.named_parameters())
    wanted = [params[n] for n in names]
    args = tuple(_double(a) for a in _as_tuple(inputs))
    y = _double(targets)
    with torch.no_grad(), _randomness_off(m) if replay_seed is not None else contextlib.nullcontext():
        alone = [m(*(_take(a, i, batch_axis) for a in args)) for i in range(_batch_of(args, batch_axis))]
        together = m(*args)
        if replay_seed is not None and not torch.equal(together, m(*args)):
            raise AssertionError("the model is random even with every module but the norms in eval mode")
    with _seeded(replay_seed):
        full = m(*args)
    batch = full.shape[0]
    if len(alone) != batch:
        raise ValueError(f"the model's output has {batch} rows but its inputs' axis {batch_axis} has {len(alone)}")
    rows_alone = torch.cat(alone)
    gap = float((rows_alone - together).abs().max())
    if not gap <= 1e-9 * float(together.abs().max()):
        raise AssertionError(
            f"an example run alone gives an output {gap:.3g} away from its row of the batch output: the model "
            "couples its examples in the forward (train-mode BatchNorm) or batch_axis is wrong; the harness does "
            "not apply"
        )
    (d_out,) = torch.autograd.grad(lf(full, y), full, retain_graph=True)
    factor = batch if lf.reduction in ("mean", "batchmean") else 1
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(batch):
        mask = torch.zeros_like(d_out)
        mask[i] = d_out[i]
        gs = torch.autograd.grad(full, wanted, grad_outputs=mask, retain_graph=True, allow_unused=True)
        for n, g, p in zip(names, gs, wanted, strict=True):
            rows[n].append(torch.zeros_like(p) if g is None else g * factor)
    return {n: torch.stack(v).detach().cpu().numpy() for n, v in rows.items()}


def _batch_of(args: tuple, batch_axis: int) -> int:
    sizes = {a.shape[batch_axis] for a in args if torch.is_tensor(a) and a.dim() > batch_axis}
    if len(sizes) != 1:
        raise ValueError(f"the inputs' axis {batch_axis} does not give one batch size: {sizes}")
    return sizes.pop()


def random_directions(
    shapes: dict[str, torch.Size], k: int, seed: int = 0, device: torch.device | str = "cpu"
) -> dict[str, dict[str, torch.Tensor]]:
    """K random directions (standard normal, one tensor per parameter, fixed seed) under ``v<k>``, and
    each one restricted to each parameter under ``v<k>/<name>`` (projections per parameter). Drawn on
    the CPU (the same numbers on every device), then moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for j in range(k):
        v = {n: torch.randn(s, generator=gen).to(device) for n, s in shapes.items()}
        out[f"v{j}"] = v
        for n, t in v.items():
            out[f"v{j}/{n}"] = {n: t}
    return out


def _mismatch(quantity: str, got: Any, want: np.ndarray, rtol: float, noise: np.ndarray | float = 0.0) -> str | None:
    """None if |got_i - want_i| <= rtol * max_j |want_j| + noise_i for every sample i, else what failed."""
    if got is None:
        return f"{quantity}: the cockpit gave no value"
    got = np.asarray(got, dtype=np.float64)
    if got.shape != want.shape:
        return f"{quantity}: the cockpit gave shape {got.shape}, the loop {want.shape}"
    if not np.all(np.isfinite(got)):
        return f"{quantity}: the cockpit gave non-finite values {got}"
    scale = float(np.abs(want).max()) if want.size else 0.0
    tol = rtol * scale + np.broadcast_to(noise, want.shape)
    err = np.abs(got - want)
    if np.all(err <= tol):
        return None
    i = int(np.argmax(err - tol))
    return (
        f"{quantity}: |cockpit - loop| = {err[i]:.3g} at sample {i} (cockpit {got[i]:.9g}, loop {want[i]:.9g}) > "
        f"tolerance {tol[i]:.3g} ({rtol:g} x scale {scale:.3g} + float32 noise {tol[i] - rtol * scale:.3g})"
    )


def _run(
    model,
    args,
    targets,
    loss_fn,
    params: list[nn.Parameter],
    directions,
    replay_seed: int | None = None,
    flags=FLAGS,
    warmup: int = 0,
):
    recorder = _Recorder(directions, flags)
    opt = torch.optim.SGD(params, lr=0.0)  # theta unchanged: a step can be repeated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Cockpit(model, opt, loss_fn, instruments=[recorder]):
            for _ in range(warmup + 1):  # (the recorder keeps the last step's record)
                opt.zero_grad()
                with _seeded(replay_seed):
                    out = model(*args)
                loss_fn(out, targets).backward()
                opt.step()
    opt.zero_grad()
    return recorder, [str(w.message) for w in caught]


def _owner_groups(model: nn.Module, names: Sequence[str]) -> list[list[str]]:
    """The parameter names grouped by the module that holds them directly."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.rpartition(".")[0], []).append(n)
    return list(groups.values())


def assert_matches_loop(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    loss_fn: nn.Module,
    *,
    params: Iterable[nn.Parameter] | None = None,
    batch_axis: int = 0,
    n_directions: int = 3,
    seed: int = 0,
    rtol: float = RTOL,
    rng_seed: int | None = None,
    device: torch.device | str | None = None,
    totals: bool = True,
    warmup: int = 0,
) -> Checked:
    """Check the cockpit's per-sample split of one step against the float64 loop (module docstring).

    Args:
        model, inputs, targets, loss_fn: one step ``loss_fn(model(*inputs), targets)``; ``inputs`` is a
            tensor or a tuple of positional arguments. The model must treat examples independently
            (no train-mode BatchNorm) and is left unchanged (lr = 0); a random one (dropout) is
            replayed from a fixed seed (module docstring).
        params: the parameters the optimizer holds (default: every trainable one).
        batch_axis: the batch axis of the tensors in ``inputs`` (the output's batch axis is 0).
        n_directions / seed: the random directions projected onto.
        rtol: allowed error relative to the largest |value| of each quantity over the samples.
        rng_seed: replay a random model from this seed (default ``REPLAY_SEED`` when it is random).
        device: move the model and loss module (in place) and the inputs and targets there first
            (None: leave everything where it is); the directions go to the parameters' device.
        totals: also run a second step asking for the squared norms' total alone (off for a test
            counting what one step calls).
        warmup: steps the cockpit runs before the checked one (what it learns on a first step, such as
            parameters it serves from the next: ``PerSampleEngine.rehome``).

    Raises:
        AssertionError naming each parameter and quantity that failed.
    """
    if device is not None:
        model.to(device)
        loss_fn.to(device)
        inputs, targets = to_device(inputs, device), to_device(targets, device)
    args = _as_tuple(inputs)
    held = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    ids = {id(p) for p in held}
    named = {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) in ids}
    names = list(named)
    replay = rng_seed if rng_seed is not None else (REPLAY_SEED if is_random(model, args) else None)
    ref = shares_loop(model, args, targets, loss_fn, names, batch_axis, replay)
    where = next(iter(named.values())).device if named else "cpu"
    directions = random_directions({n: p.shape for n, p in named.items()}, n_directions, seed, where)
    recorder, seen = _run(model, args, targets, loss_fn, list(named.values()), directions, replay, warmup=warmup)
    rec = recorder.record
    if rec is None or rec.per_sample_sq_norms_by_param is None:
        notes = rec.notes if rec is not None else []
        raise AssertionError(f"the cockpit gave no per-sample numbers; notes: {notes}; warnings: {seen}")

    failures = [f"gradient-sum check: {w}" for w in seen if "do not add up" in w]  # a false alarm if all else matches
    batch = next(iter(ref.values())).shape[0]
    c = 1.0 / batch if loss_fn.reduction in ("mean", "batchmean") else 1.0
    # the reference itself: its float64 shares must add up to the float32 p.grad of the cockpit's step
    whole = c * NOISE * sum(np.linalg.norm(np.concatenate([ref[n].reshape(batch, -1) for n in names], 1), axis=1))
    for n in names:
        total = c * ref[n].sum(0)
        tol = rtol * c * np.linalg.norm(ref[n].reshape(batch, -1), axis=1).sum() + whole
        got = recorder.grads[n].cpu().numpy() if n in recorder.grads else np.zeros_like(total)  # no p.grad: zero
        diff = np.linalg.norm(got - total)
        if not diff <= tol:
            failures.append(
                f"reference for {n}: the loop's g_i do not add up to the step's p.grad (|diff| {diff:.3g} > "
                f"{tol:.3g}): the step is random in a way a seed does not replay, a hook changes p.grad, or the "
                "float64 copy of the model computes something else; the harness does not apply"
            )
    got_names, want_names = set(rec.per_sample_sq_norms_by_param), set(names)
    if got_names != want_names:
        failures.append(f"parameters: the cockpit covers {sorted(got_names)}, the optimizer holds {sorted(want_names)}")
    flat = {n: ref[n].reshape(batch, -1) for n in names}
    G = np.concatenate([flat[n] for n in names], axis=1)
    delta = NOISE * np.linalg.norm(G, axis=1)  # round-off of each g_i, all parameters
    for n in names:
        if n in got_names:
            norm = np.linalg.norm(flat[n], axis=1)
            noise = delta * (2 * norm + delta)  # | ||g + d||^2 - ||g||^2 | <= ||d|| (2 ||g|| + ||d||)
            want = norm**2
            failures.append(_mismatch(f"||g_i||^2 of {n}", rec.per_sample_sq_norms_by_param[n], want, rtol, noise))
    # ||g_i||^2 over all parameters: in the record of the main step (summed from the rows per parameter), and
    # of a second step that asks for the total alone (summed on the device layer by layer, no row per parameter)
    norm = np.linalg.norm(G, axis=1)
    noise = delta * (2 * norm + delta)
    failures.append(_mismatch("||g_i||^2 (all parameters)", rec.per_sample_sq_norms, norm**2, rtol, noise))
    if totals:
        alone, _ = _run(
            model, args, targets, loss_fn, list(named.values()), {}, replay, {Need.PER_SAMPLE_SQ_NORMS}, warmup
        )
        total_rec = alone.record
        if total_rec is not None and total_rec.per_sample_sq_norms_by_param is not None:
            failures.append("the total alone was asked for, yet the record holds rows per parameter")
        got = None if total_rec is None else total_rec.per_sample_sq_norms
        failures.append(_mismatch("||g_i||^2 (all parameters, asked alone)", got, norm**2, rtol, noise))
    gbar = G.mean(0)
    noise = delta * (np.linalg.norm(gbar) + delta.mean())  # noise of g_i times gbar, g_i times noise of gbar
    dot_failure = _mismatch("g_i . gbar (all parameters)", rec.per_sample_dot_mean, G @ gbar, rtol, noise)
    if dot_failure is not None:
        failures.append(
            dot_failure + _localise_dot_mean(model, args, targets, loss_fn, named, flat, rtol, delta, replay)
        )
    for key, d in directions.items():
        v = {n: t.double().cpu().numpy().reshape(-1) for n, t in d.items()}
        want = sum(flat[n] @ v[n] for n in v)
        noise = delta * np.sqrt(sum(float(x @ x) for x in v.values()))
        what = f"g_i . {key}" if "/" in key else f"g_i . {key} (all parameters)"
        failures.append(_mismatch(what, rec.projections.get(key), want, rtol, noise))
    failures = [f for f in failures if f is not None]
    if failures:
        raise AssertionError(
            f"per-sample split of {type(model).__name__} ({loss_fn.reduction} loss) does not match the float64 "
            "loop:\n  " + "\n  ".join(failures) + (f"\nwarnings: {seen}" if seen else "")
        )
    return Checked(rec, ref, directions, seen)


def _localise_dot_mean(model, args, targets, loss_fn, named, flat, rtol, delta, replay) -> str:
    """Run the step again per module (an optimizer with that module's parameters alone) and name the
    parameters whose g_i . gbar fails."""
    bad = []
    for group in _owner_groups(model, list(named)):
        try:
            recorder, _ = _run(model, args, targets, loss_fn, [named[n] for n in group], {}, replay)
            got = recorder.record.per_sample_dot_mean if recorder.record is not None else None
        except Exception as e:  # the diagnosis must not hide the failure it explains
            bad.append(f"{'+'.join(group)} (rerun failed: {e})")
            continue
        G = np.concatenate([flat[n] for n in group], axis=1)
        gbar = G.mean(0)
        noise = delta * (np.linalg.norm(gbar) + delta.mean())
        msg = _mismatch(f"g_i . gbar of {'+'.join(group)}", got, G @ gbar, rtol, noise)
        if msg is not None:
            bad.append(msg)
    if not bad:
        return "\n    no module alone reproduces it"
    return "\n    per module: " + "\n    ".join(bad)


def watched_steps(model: nn.Module, batches: list[tuple], penalty=None) -> tuple[list[str], list]:
    """Train on ``batches`` ((inputs, targets) pairs; a loss term ``penalty(model)`` added outside the loss
    module) with per-sample norms tracked: the cockpit's warnings and the step records."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    records = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cockpit = Cockpit(model, opt, loss_fn, instruments=[PerSampleGradNorms()], sinks=[])
        cockpit.instruments[0].compute = lambda record: records.append(record) or {}
        for inputs, y in batches:
            opt.zero_grad()
            loss = loss_fn(model(*inputs), y)
            (loss + penalty(model) if penalty is not None else loss).backward()
            opt.step()
        cockpit.close()
    return [str(w.message) for w in caught if "cockpit-lite" in str(w.message)], records
