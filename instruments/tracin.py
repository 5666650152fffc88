"""TracIn traced during training (Pruthi, Liu, Kale, Sundararajan, NeurIPS 2020).

First-order TracIn of a training example z on an example z' sums, over the optimizer steps t whose
batch B_t contained z, the first-order change of the loss on z' that z's share of the step causes:

    TracIn(z, z') = sum_{t: z in B_t} eta_t c_t  g_t(z) . g_t(z')          (REFERENCE.md section 5)

with g_t(.) the gradient of the per-example loss at theta_t (the parameters before step t), eta_t the
learning rate the optimizer used at step t, and c_t the batch factor of the loss (p.grad = c_t sum_i g_i:
1/B for reduction="mean", 1 for "sum"). Self-influence is TracIn(z, z) = sum_t eta_t c_t ||g_t(z)||^2.
With several parameter groups, each parameter's contribution is weighted by its own group's lr (the
SGD step of that group). For other optimizers (momentum, Adam) this is the SGD form of the paper,
evaluated with each step's lr: a heuristic there, as in Pruthi et al.

Positive TracIn(z, z'): z is a proponent of z' (training on z lowered the loss on z'); negative: an
opponent. High self-influence flags examples the model had to bend towards: mislabelled or atypical.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from cockpit_lite.instruments._util import refuse_state
from cockpit_lite.instruments.panels import InfluencePanel, influence_summary

from cockpit_lite import Instrument, Need, Needs
from cockpit_lite.distributed import DISTRIBUTED, all_gather_objects, is_sharded
from cockpit_lite.errors import CockpitWarning
from cockpit_lite.losses import gradient_scale
from cockpit_lite.model_io import tensors_of
from cockpit_lite.pause import paused
from cockpit_lite.persample.cross import Projector, ViewCollector, cross
from cockpit_lite.persample.views import JoinedView

NEEDS_TRACK = (
    "TracIn needs the dataset index of every example in each batch: iterate the training data as "
    "`for x, y in cockpit.track(loader):` (same batches as `for x, y in loader:`, the cockpit then "
    "learns the indices)"
)


def _scatter_add(target: np.ndarray, idx: np.ndarray, values: np.ndarray, unique: bool | None = None) -> None:
    """target[idx] += values, correct also for repeated indices (sampling with replacement).
    ``unique``: whether idx holds no repeats, if the caller already knows."""
    if unique is None:
        unique = len(np.unique(idx)) == len(idx)
    if unique:
        target[idx] += values
    else:
        np.add.at(target, idx, values)


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and bool(np.allclose(a, b, rtol=1e-9, atol=0.0))


def top_table(scores: np.ndarray, k: int, largest: bool = True) -> dict[str, np.ndarray]:
    """{"index": the k indices with the largest (or smallest) scores, best first, "score": theirs}."""
    scores = np.asarray(scores, dtype=np.float64)
    k = min(k, scores.shape[-1])
    order = np.argsort(-scores if largest else scores, axis=-1, kind="stable")[..., :k]
    return {"index": order, "score": np.take_along_axis(scores, order, axis=-1)}


class TracIn(Instrument):
    """Online TracIn: self-influence of every training example and, with probes, the influence of
    every training example on every probe, accumulated while training runs.

    Args:
        probes: optional ``(inputs, targets)`` of the examples to explain (test points); ``inputs`` a
            tensor or a tuple of tensors passed as ``model(*inputs)``.
        projection_dim: if given, probe influence uses Kronecker-structured Gaussian random
            projections of each layer's factors to this many dimensions (unbiased; relative error of
            an entry about 2/sqrt(k) of |g||g'|, see docs/tracin.md). Self-influence is always exact.
        projection_seed: seed of the projections (a private generator; the user's RNG is untouched).
        top_k: how many top examples / proponents / opponents to write into the run at close.
        write_scores: also write the whole self-influence vector (N floats) into the run at close.
        every / schedule / name: as for every instrument; TracIn sums over the traced steps only.

    Cost per traced step: per-sample squared norms (engine, about one extra weight-gradient matmul);
    with K probes one forward and one backward-to-activations of the K probes under a forked RNG, in
    the model's current (training) mode, plus per layer a (B x K) cross-Gram from the factors.
    Memory: N floats, plus N x K with probes.
    """

    READS_VALUES_IN_HOOKS = False  # (its hook reads parameters and fields filled at once: no flush for it)

    KEY = "tracin"
    TAGS = {
        "tracin/steps": "number of steps traced",
        "tracin/self_influence": "self-influence of every training example (N values)",
        "tracin/self_influence/top": "the top_k examples by self-influence (table)",
        "tracin/(proponents|opponents)": "per probe, the training examples of largest / most negative influence",
        "tracin/.+": "other TracIn records (TracInCP.write: tracin/cp/...)",
    }
    PANELS = (InfluencePanel(),)
    CHARTS = {"Influence": {"TracIn scalars": ["Multiline", ["^tracin/.*"]]}}
    SUMMARY = (influence_summary,)
    ORDER = 80.0

    def __init__(
        self,
        probes: tuple[Any, Any] | None = None,
        projection_dim: int | None = None,
        projection_seed: int = 0,
        top_k: int = 20,
        write_scores: bool = True,
        **kw,
    ):
        super().__init__(**kw)
        if probes is not None:
            if not (isinstance(probes, Sequence) and len(probes) == 2):
                raise ValueError("probes must be a pair (inputs, targets), e.g. probes=(x_test, y_test)")
            inputs, targets = probes
            if isinstance(inputs, (tuple, list)):
                n = len(inputs[0])
            else:
                n = len(inputs)
            if len(targets) != n:
                raise ValueError(f"probes: {n} inputs but {len(targets)} targets")
            self.n_probes = n
        else:
            self.n_probes = 0
        self.probes = probes
        self.projector = Projector(projection_dim, projection_seed) if projection_dim is not None else None
        self.top_k = top_k
        self.write_scores = write_scores
        self._self = np.zeros(0)
        self._infl = np.zeros((0, self.n_probes))
        self._seen = np.zeros(0, dtype=bool)
        self.steps = 0
        self.probe_steps = 0
        self._pending_probe: tuple | None = None  #: (dataset indices, deferred rows) of this step's probes
        self._group_of: dict[str, int] = {}
        self._collector: ViewCollector | None = None
        self._model: torch.nn.Module | None = None
        self._warned: set[str] = set()
        self._unique: tuple[int, bool] = (-1, False)  # (step, whether that step's indices repeat none)

    # --- plumbing -----------------------------------------------------------------------------------
    @property
    def key(self) -> str:
        return self.name or "tracin"

    def requires(self, step: int) -> Needs:
        if not self.scheduled(step):
            return Needs()
        flags = {Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_SQ_NORMS_BY_PARAM, Need.INDICES}
        if self.probes is not None:
            flags.add(Need.PER_SAMPLE_CROSS)
        return Needs(flags)

    def on_attach(self, model, optimizer):
        self._model = model
        groups = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self._group_of = {n: groups[id(p)] for n, p in model.named_parameters() if id(p) in groups}
        if self.probes is not None:
            self._try_probes(model)
            # the same parameters as the engine's views of the training batch: the optimizer's
            self._collector = ViewCollector(model, params=set(groups))

    def _try_probes(self, model: torch.nn.Module) -> None:
        """Run the probes' inputs through ``model`` once, so that a shape or dtype error is named at attach
        (a ValueError) rather than at the first step. Training is unchanged: no cockpit sees the call
        (``paused()``), no graph (``no_grad``), the random streams forked, every module in eval mode (no
        dropout, no BatchNorm statistics updated), every buffer replaced by a copy for the call, embeddings'
        ``max_norm`` renormalisation off; modes, buffers and ``max_norm`` are restored after. Skipped for a
        model sharded by FSDP (the forward would start collectives)."""
        params = list(model.parameters())
        if not params or any(is_sharded(p) for p in params):
            return
        device = params[0].device
        inputs, _ = self.probes
        move = lambda t: t.to(device) if torch.is_tensor(t) else t  # noqa: E731
        args = tuple(move(t) for t in inputs) if isinstance(inputs, (tuple, list)) else (move(inputs),)
        modes = [(m, m.training) for m in model.modules()]
        embeddings = (torch.nn.Embedding, torch.nn.EmbeddingBag)
        renorms = [(m, m.max_norm) for m in model.modules() if isinstance(m, embeddings)]
        buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
        devices = sorted({p.device.index or 0 for p in params if p.is_cuda})
        try:
            model.eval()
            for m, _ in renorms:
                m.max_norm = None
            for m, name, b in buffers:
                m._buffers[name] = b.detach().clone()
            with paused(), torch.no_grad(), torch.random.fork_rng(devices=devices):
                output = model(*args)
        except Exception as e:
            raise ValueError(
                f"TracIn: the model fails on the probe inputs ({type(e).__name__}: {e}). Pass "
                "probes=(inputs, targets) with inputs shaped and typed like a training batch's (K examples "
                "along axis 0, on any device; a tuple of tensors is passed as model(*inputs))"
            ) from None
        finally:
            for m, training in modes:
                m.training = training
            for m, max_norm in renorms:
                m.max_norm = max_norm
            for m, name, b in buffers:
                m._buffers[name] = b
        first = next(iter(tensors_of(output)), None)
        if first is not None and first.dim() > 0 and first.shape[0] != self.n_probes:
            raise ValueError(
                f"TracIn: the model returns {first.shape[0]} rows for {self.n_probes} probes: the probes' batch "
                "must be axis 0 of their inputs (K examples as the model takes a batch)"
            )

    def _warn(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            warnings.warn(f"cockpit-lite: {msg}", CockpitWarning, stacklevel=2)

    def _ensure(self, n: int) -> None:
        if n > len(self._self):
            grow = n - len(self._self)
            self._self = np.concatenate([self._self, np.zeros(grow)])
            self._seen = np.concatenate([self._seen, np.zeros(grow, dtype=bool)])
            self._infl = np.concatenate([self._infl, np.zeros((grow, self.n_probes))])

    def _weights(self, record, names) -> dict[str, float] | None:
        """eta_t c_t per parameter name (its group's lr times the batch factor)."""
        if record.batch_size is None or record.reduction is None or not record.lrs:
            return None
        c = gradient_scale(record.reduction, record.batch_size)
        lrs = record.lrs
        out = {}
        for n in names:
            gi = self._group_of.get(n, 0)
            out[n] = (lrs[gi] if gi < len(lrs) else lrs[0]) * c
        return out

    def _indices(self, record) -> np.ndarray | None:
        idx = record.indices
        if idx is None:
            self._warn(NEEDS_TRACK)
            return None
        self._ensure(max(int(idx.max()) + 1, record.dataset_size or 0))
        if self._unique[0] != record.step:
            self._unique = (record.step, len(np.unique(idx)) == len(idx))
        return idx

    # --- state (resuming a run) -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``self_influence`` (N float64), ``influence`` (N x K float64), ``seen`` (N bool), the counts
        ``steps`` and ``probe_steps``, and what the sums depend on: ``n_probes``, ``projection``
        ([projection_dim, projection_seed] or None) and ``probe_fingerprint`` (checked on loading)."""
        return {
            "self_influence": torch.tensor(self._self, dtype=torch.float64),
            "influence": torch.tensor(self._infl, dtype=torch.float64).reshape(len(self._infl), self.n_probes),
            "seen": torch.tensor(self._seen, dtype=torch.bool),
            "steps": self.steps,
            "probe_steps": self.probe_steps,
            "n_probes": self.n_probes,
            "projection": None if self.projector is None else [self.projector.k, self.projector.seed],
            "probe_fingerprint": self._probe_fingerprint(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; refused if the probe influence was summed for other probes or
        another projection (the sums would mix two different quantities)."""
        proj = None if self.projector is None else [self.projector.k, self.projector.seed]
        saved = None if state["projection"] is None else [int(v) for v in state["projection"]]
        fp, now = state["probe_fingerprint"], self._probe_fingerprint()
        if int(state["n_probes"]) != self.n_probes:
            why = f"the state holds influence on {state['n_probes']} probes, this TracIn has {self.n_probes}"
        elif int(state["probe_steps"]) > 0 and saved != proj:
            why = f"the probe influence was summed with projection {saved}, this TracIn uses {proj}"
        elif int(state["probe_steps"]) > 0 and fp is not None and now is not None and not _close(fp, now):
            why = "the probe influence was summed for other probes (their values differ)"
        else:
            why = None
        if why is not None:
            raise refuse_state(
                "TracIn",
                why,
                "Build TracIn with the probes and projection_dim/projection_seed of the saved run, or leave "
                "'tracin' out of the state to start its sums afresh.",
            )
        self_infl = state["self_influence"].detach().cpu().double().numpy().copy()
        n = len(self_infl)
        self._self = self_infl
        self._infl = state["influence"].detach().cpu().double().numpy().reshape(n, self.n_probes).copy()
        self._seen = state["seen"].detach().cpu().numpy().astype(bool).copy()
        self.steps = int(state["steps"])
        self.probe_steps = int(state["probe_steps"])
        self._unique = (-1, False)

    def _probe_fingerprint(self) -> list[float] | None:
        """Position-weighted sums of the probes' inputs and targets (float64, on the CPU): tells probes
        apart, and their order, without storing them."""
        if self.probes is None:
            return None
        inputs, targets = self.probes
        parts = [*(inputs if isinstance(inputs, (tuple, list)) else (inputs,)), targets]
        weights = torch.arange(1, self.n_probes + 1, dtype=torch.float64)
        out = []
        for t in parts:
            if torch.is_tensor(t) and t.dim() > 0 and len(t) == self.n_probes:
                rows = t.detach().cpu().double().reshape(self.n_probes, -1).sum(1)
                out += [float(rows @ weights), float(rows @ rows)]
        return out

    # --- per step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def on_before_step(self, record):
        """Probe influence at theta_t (parameters not yet updated): sum_layers eta c g_i . h_k, for every
        example i of the step (under gradient accumulation ``record.views`` are
        :class:`~cockpit_lite.persample.views.JoinedView` s over all micro-batches, rows in the order of
        ``record.indices``).

        Under data-parallel training each rank crosses its own examples' factors with the probes and
        the rows (n_k x K, weighted by 1/W: DDP averages the ranks' gradients) are gathered with the
        ranks' dataset indices, so every rank adds the influence of the global batch."""
        if self.probes is None:
            return
        ranks = record.get(DISTRIBUTED)
        merged = ranks is not None and ranks.world > 1
        try:
            idx, rows, why = self._probe_rows(record, 1.0 / ranks.world if merged else 1.0)
        except Exception as e:  # under DDP the other ranks still wait for this rank's rows
            if not merged:
                raise
            idx, rows, why = None, None, f"{type(e).__name__}: {e}"
        if not merged and why is None and idx is not None:
            # the rows reach the host with the step's other numbers (one transfer): added in compute()
            self._pending_probe = (idx, record.host.defer([rows]))
            return
        rows = rows.cpu().numpy() if torch.is_tensor(rows) else rows
        if merged:
            parts = all_gather_objects((idx, rows, why))
            whys = [f"rank {k}: {w}" for k, (_, _, w) in enumerate(parts) if w]
            if any(i is None for i, _, _ in parts):
                if whys:
                    self._warn(f"TracIn probes skipped at step {record.step} ({'; '.join(whys)})")
                return
            idx = np.concatenate([i for i, _, _ in parts])
            rows = np.concatenate([r for _, r, _ in parts])
        elif why:
            self._warn(f"TracIn probes skipped at step {record.step}: {why}")
        if idx is None:
            return
        self._add_probe_rows(idx, rows, record.dataset_size)

    def _add_probe_rows(self, idx: np.ndarray, rows: np.ndarray, dataset_size: int | None) -> None:
        """Add a step's probe influence rows (n x K) to the dataset indices ``idx`` they belong to."""
        self._ensure(max(int(idx.max()) + 1, dataset_size or 0))
        _scatter_add(self._infl, idx, rows)
        self.probe_steps += 1

    def _probe_rows(self, record, weight: float) -> tuple[np.ndarray | None, torch.Tensor | None, str | None]:
        """(dataset indices, influence rows (B x K, float64, on the device) times ``weight``, why not) of
        this rank's batch."""
        if record.indices is None:
            return None, None, None  # compute() says how to get indices
        if not record.views:
            notes = "; ".join(map(str, record.notes))
            return None, None, "no per-sample factors" + (f" ({notes})" if notes else "")
        idx = record.indices
        probe_views, _ = self._probe_views(record)
        weights = self._weights(record, [n for v in record.views for n in v.names])
        if weights is None:
            return None, None, None
        by_weight: dict[float, torch.Tensor] = {}  # one sum per distinct eta c (one per parameter group)
        for view in record.views:
            other = probe_views.get(tuple(view.names))
            if other is None:  # the probes do not reach this layer: zero gradient there
                continue
            joined = isinstance(view, JoinedView)  # gradient accumulation: every micro-batch's examples
            pairs = view.cross(other, self.projector) if joined else cross(view, other, self.projector)
            for name, c in pairs.items():
                w = weights[name]
                if w in by_weight:
                    by_weight[w].add_(c)  # cross() returns fresh tensors
                else:
                    by_weight[w] = c
        if not by_weight:
            return None, None, None
        total = sum(c.double() * (w * weight) for w, c in by_weight.items())
        if total.shape[0] != len(idx):  # never expected: rows and indices must describe the same examples
            return None, None, f"{total.shape[0]} rows of per-sample factors for {len(idx)} dataset indices"
        return np.asarray(idx), total, None

    def _probe_views(self, record):
        inputs, targets = self.probes
        device = next(iter(record.params.values())).device
        move = lambda t: t.to(device) if torch.is_tensor(t) else t  # noqa: E731
        inputs = tuple(move(t) for t in inputs) if isinstance(inputs, (tuple, list)) else move(inputs)
        targets = move(targets)
        self.probes = (inputs, targets)  # moved once
        return self._collector(inputs, targets, record.loss_fn)

    def compute(self, record):
        if self._pending_probe is not None:
            (probe_idx, deferred), self._pending_probe = self._pending_probe, None
            self._add_probe_rows(probe_idx, deferred.get()[0], record.dataset_size)
        idx = self._indices(record)
        if idx is None:
            return {}
        by_param = record.per_sample_sq_norms_by_param
        if by_param is None:
            self._warn(f"TracIn skipped step {record.step}: no per-sample gradient norms ({record.notes})")
            return {}
        weights = self._weights(record, by_param)
        if weights is None:
            return {}
        s = sum(weights[n] * sq for n, sq in by_param.items())
        _scatter_add(self._self, idx, s, self._unique[1])
        self._seen[idx] = True
        self.steps += 1
        return {}

    # --- results ------------------------------------------------------------------------------------
    def _check(self) -> None:
        if self.steps == 0:
            raise RuntimeError(f"TracIn has traced no step yet. {NEEDS_TRACK}.")

    def self_influence(self) -> np.ndarray:
        """TracIn(z, z) for every training example z (indexed like the tracked loader's dataset;
        0 for examples no traced batch contained)."""
        self._check()
        return self._self.copy()

    def influence(self) -> np.ndarray:
        """(N, K) array: TracIn(z_i, probe_k) for every training example i and probe k."""
        self._check()
        if self.probes is None:
            raise RuntimeError("TracIn was built without probes: pass TracIn(probes=(x_test, y_test))")
        return self._infl.copy()

    def proponents(self, probe: int = 0, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Dataset indices and scores of the k training examples with the largest influence on
        ``probe`` (most positive first)."""
        t = top_table(self.influence()[:, probe], k, largest=True)
        return t["index"], t["score"]

    def opponents(self, probe: int = 0, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Dataset indices and scores of the k training examples with the most negative influence."""
        t = top_table(self.influence()[:, probe], k, largest=False)
        return t["index"], t["score"]

    def seen(self) -> np.ndarray:
        """Boolean mask: which training examples appeared in at least one traced batch."""
        return self._seen.copy()

    def on_close(self):
        if self.steps == 0:
            return {}
        out: dict[str, Any] = {
            self.tag("tracin/steps"): self.steps,
            self.tag("tracin/self_influence/top"): top_table(self._self, self.top_k),
        }
        if self.write_scores:
            out[self.tag("tracin/self_influence")] = self._self
        if self.probes is not None and self.probe_steps:
            inf = self._infl.T  # (K, N)
            out[self.tag("tracin/proponents")] = top_table(inf, self.top_k, largest=True)
            out[self.tag("tracin/opponents")] = top_table(inf, self.top_k, largest=False)
        return out
