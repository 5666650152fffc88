"""nn.EmbeddingBag in modes "sum", "mean" and "max" (flat input with offsets, or (B, n) bags; per-sample
weights, padding_idx, empty bags, include_last_offset, duplicate rows within a bag, rows tied for a bag's
maximum, two calls a step) against the float64 loop; the flat view's Gram and per-sample gradients against a
direct construction of each bag's gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cockpit_lite.persample.views import BagView
from tests.harness import assert_matches_loop, watched_steps

B = 5
#: each example's ids, the first ``LENGTHS`` of each row counted: duplicates within a bag (row 0: 3, 3), an
#: empty bag (example 2), padding (id 0) in the bags of examples 0 and 3
IDS = torch.tensor([[3, 1, 3, 0, 4], [7, 2, 2, 8, 8], [5, 5, 5, 5, 5], [9, 0, 5, 1, 1], [6, 8, 4, 2, 6]])
LENGTHS = torch.tensor([4, 3, 0, 3, 5])


class Bags(nn.Module):
    """A bag of each example's ids, then a Linear head. ``flat``: the bags passed to the EmbeddingBag as
    one flat tensor with offsets (as a recommender's ragged input is), else as the rows of a (B, n) tensor;
    ``twice``: the bag module called again on the ids shifted by one (two calls in a step)."""

    def __init__(
        self, mode: str, flat: bool, padding_idx=None, last: bool = False, twice: bool = False, ties: bool = False
    ):
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 4, mode=mode, padding_idx=padding_idx, include_last_offset=last)
        self.head, self.flat, self.last, self.twice = nn.Linear(4, 3), flat, last, twice
        if ties:  # rows 4 and 8 (both in example 4's bag), 1 and 0 (example 0's) equal: torch's max picks one
            with torch.no_grad():
                self.bag.weight[4] = self.bag.weight[8]
                self.bag.weight[1] = self.bag.weight[0]

    def _bags(self, ids, lengths, weights):
        if not self.flat:
            return self.bag(ids, per_sample_weights=weights)
        kept = torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]
        offsets = torch.cumsum(lengths, 0) - lengths
        if self.last:
            offsets = torch.cat([offsets, lengths.sum().reshape(1)])
        return self.bag(ids[kept], offsets, per_sample_weights=None if weights is None else weights[kept])

    def forward(self, ids, lengths, weights=None):
        h = self._bags(ids, lengths, weights)
        if self.twice:
            h = h + 0.5 * self._bags((ids + 1) % 10, lengths, weights)
        return self.head(torch.tanh(h))


def _weights():
    return torch.rand(B, IDS.shape[1]) + 0.5


CASES = {
    "sum, flat with offsets": (lambda: Bags("sum", True), lambda: (IDS, LENGTHS)),
    "mean, flat, padding_idx": (lambda: Bags("mean", True, padding_idx=0), lambda: (IDS, LENGTHS)),
    "sum, flat, per-sample weights, include_last_offset": (
        lambda: Bags("sum", True, last=True),
        lambda: (IDS, LENGTHS, _weights()),
    ),
    "mean, flat, two calls a step": (lambda: Bags("mean", True, twice=True), lambda: (IDS, LENGTHS)),
    "mean, (B, n) bags with padding": (lambda: Bags("mean", False, padding_idx=0), lambda: (IDS, LENGTHS)),
    "sum, (B, n) bags with weights": (lambda: Bags("sum", False), lambda: (IDS, LENGTHS, _weights())),
    "max, (B, n) bags": (lambda: Bags("max", False), lambda: (IDS, LENGTHS)),
    "max, flat with offsets": (lambda: Bags("max", True), lambda: (IDS, LENGTHS)),
    "max, flat, padding_idx, include_last_offset": (
        lambda: Bags("max", True, padding_idx=0, last=True),
        lambda: (IDS, LENGTHS),
    ),
    "max, flat, two calls a step": (lambda: Bags("max", True, twice=True), lambda: (IDS, LENGTHS)),
    "max, (B, n) bags with padding": (lambda: Bags("max", False, padding_idx=0), lambda: (IDS, LENGTHS)),
    "max, flat, rows tied for the maximum": (lambda: Bags("max", True, ties=True), lambda: (IDS, LENGTHS)),
    "max, flat, a bag of padding only": (
        lambda: Bags("max", True, padding_idx=0),
        lambda: (torch.where(torch.arange(B)[:, None] == 1, 0, IDS), LENGTHS),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bags_are_exact(case, device):
    build, inputs = CASES[case]
    torch.manual_seed(0)
    model = build()
    checked = assert_matches_loop(model, inputs(), torch.randint(0, 3, (B,)), nn.CrossEntropyLoss(), device=device)
    assert set(checked.record.per_sample_sq_norms_by_param) == {"bag.weight", "head.weight", "head.bias"}
    assert not checked.warnings, checked.warnings


def test_the_flat_view_against_each_bag_formed():
    """Squared norms, Gram, g_i . gbar, projections and g_i of a BagView against each bag's gradient built
    element by element in float64."""
    torch.manual_seed(0)
    n, d, bags = 6, 3, 4
    v = torch.tensor([1, 1, 4, 0, 2, 5, 5, 5, 1])
    b = torch.tensor([0, 0, 0, 1, 1, 3, 3, 3, 0])  # bag 2 empty, rows repeated within bags 0 and 3
    rows = torch.randn(v.numel(), d, dtype=torch.float64)
    want = torch.zeros(bags, n, d, dtype=torch.float64)
    for j in range(v.numel()):
        want[b[j], v[j]] += rows[j]
    flat = want.reshape(bags, -1)
    view = BagView(v, b, rows, bags, "w", n)
    direction = torch.randn(n, d, dtype=torch.float64)
    assert torch.allclose(view.sq_norms()["w"], (flat**2).sum(1))
    assert torch.allclose(view.gram()["w"], flat @ flat.T)
    assert torch.allclose(view.dot_mean(), flat @ flat.mean(0))
    assert torch.allclose(view.project_many({"k": {"w": direction}})["k"], flat @ direction.reshape(-1))
    assert torch.allclose(view.grads()["w"], want)


class TwoBagsEach(nn.Module):
    """Two bags per example (a flat input with 2 B offsets): bag i is not example i."""

    def __init__(self):
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(10, 4, mode="sum"), nn.Linear(8, 3)

    def forward(self, ids):
        flat = ids.reshape(-1)
        offsets = torch.arange(0, flat.numel(), ids.shape[1] // 2)
        return self.head(self.bag(flat, offsets).reshape(ids.shape[0], 8))


def test_more_bags_than_examples_leave_out_the_bag_alone():
    torch.manual_seed(0)
    said, records = watched_steps(TwoBagsEach(), [((IDS[:, :4],), torch.randint(0, 3, (B,)))])
    said = [m for m in said if "leave out" in m]
    assert said and all("made 10 bags for a batch of 5" in m for m in said), said
    assert records[0].per_sample_uncovered and "head.weight" not in records[0].per_sample_uncovered
    assert records[0].per_sample_sq_norms is not None  # (the rest is still computed)


def test_an_accumulated_step_joins_the_bags_of_every_micro_batch():
    """Micro-batches of 2 and 5 examples of flat bags: the step's joined views (Gram and squared norms)
    against the float64 loop over the 7."""
    from tests.reference import assert_accumulated_views_match_loop

    class Packed(Bags):  # (one input tensor for the loop: the lengths in the last column)
        def forward(self, packed):
            return super().forward(packed[:, :-1], packed[:, -1])

    torch.manual_seed(0)
    x = torch.cat([torch.cat([IDS, LENGTHS[:, None]], 1)] * 2)[:7]
    assert_accumulated_views_match_loop(Packed("mean", True, padding_idx=0), x, torch.randint(0, 3, (7,)), [2, 5])
