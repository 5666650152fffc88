"""Mixtures of experts as Hugging Face writes them (transformers 5: a top-k router and the experts' weights
fused into 3-D parameters, both called on the (B T, d) tokens of the batch): each example's tokens replayed
alone (their rows of every argument, in example order) against the float64 loop; a module that mixes the
rows of several examples is left out with the reason, never split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests import models_lm as M
from tests.harness import assert_matches_loop, watched_steps

B, T, D, E, K = 4, 5, 6, 4, 2


class Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D) / 2)

    def forward(self, h):
        logits = F.linear(h, self.weight)
        top, idx = torch.topk(logits.softmax(-1), K, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), idx


class Experts(nn.Module):
    """E experts' gated MLPs as two 3-D parameters, each expert run on the tokens routed to it (a loop whose
    shapes depend on the routing, as transformers' eager experts)."""

    def __init__(self):
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(E, 8, D) / 2)
        self.down = nn.Parameter(torch.randn(E, D, 4) / 2)

    def forward(self, h, idx, weights):
        out = torch.zeros_like(h)
        for e in range(E):
            token, slot = torch.where(idx == e)
            gate, up = F.linear(h[token], self.gate_up[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down[e]) * weights[token, slot, None]
            out = out.index_add(0, token, y)
        return out


class RowsNormalised(nn.Module):
    """A module on the (B T, d) tokens that scales them by a statistic of all of them: it mixes examples."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, D) / 2)

    def forward(self, h):
        return F.linear(h, self.weight) / h.norm()


class MoE(nn.Module):
    def __init__(self, mixing: bool = False):
        super().__init__()
        self.embed, self.head = nn.Embedding(11, D), nn.Linear(D, 3)
        self.router, self.experts = Router(), Experts()
        self.mixing = RowsNormalised() if mixing else None

    def forward(self, ids):
        x = self.embed(ids)
        h = x.reshape(-1, D)  # (B T, d): the batch's tokens
        _, weights, idx = self.router(h)
        h = h + self.experts(h, idx, weights)
        if self.mixing is not None:
            h = h + self.mixing(h)
        return self.head(h.reshape(ids.shape[0], -1, D).mean(1))


def test_router_and_fused_experts_are_exact(device):
    torch.manual_seed(0)
    model = MoE()
    checked = assert_matches_loop(
        model, torch.randint(0, 11, (B, T)), torch.randint(0, 3, (B,)), nn.CrossEntropyLoss(), device=device
    )
    assert {"router.weight", "experts.gate_up", "experts.down"} <= set(checked.record.per_sample_sq_norms_by_param)
    # (the experts' loop picks tokens by the routing: vmap cannot batch it, a loop over the examples says so)
    assert [w for w in checked.warnings if "loop over the samples" not in w] == [], checked.warnings


def test_a_module_that_mixes_the_examples_rows_is_left_out_with_its_reason():
    """Found on the host with the step's values (no wait in backward): that step's per-sample statistics
    are skipped with the reason, and from the next step on the module's parameters are left out."""
    torch.manual_seed(0)
    batches = [((torch.randint(0, 11, (B, T)),), torch.randint(0, 3, (B,))) for _ in range(2)]
    said, (first, second) = watched_steps(MoE(mixing=True), batches)
    assert first.per_sample_sq_norms is None and any(
        "does not compute them example by example" in n for n in first.notes
    )
    said = [m for m in said if "leave out" in m]
    assert said and all("does not compute them example by example" in m for m in said), said
    assert set(second.per_sample_uncovered) == {"mixing.weight"}
    assert second.per_sample_sq_norms is not None


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_hugging_face_mixtures_of_experts_are_served_whole(arch):
    """Tiny random-weight Mixtral and Qwen2-MoE (a shared expert and its gate too): every parameter served,
    the routers' and the fused experts' included."""
    import transformers

    common = dict(vocab_size=40, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    if arch == "mixtral":
        config = transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
        cls = transformers.MixtralForSequenceClassification
    else:
        config = transformers.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                                             shared_expert_intermediate_size=8)  # fmt: skip
        cls = transformers.Qwen2MoeForSequenceClassification
    config.num_labels, config.pad_token_id = 3, 0
    # transformers' default grouped_mm experts have no float64 kernel for the loop: both run the eager loop
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    model = M.LogitsForLoss(cls(config))
    ids = torch.randint(1, 40, (B, 6))
    checked = assert_matches_loop(model, ids, torch.randint(0, 3, (B,)), nn.CrossEntropyLoss())
    assert set(checked.record.per_sample_sq_norms_by_param) == {n for n, _ in model.named_parameters()}
    assert not [w for w in checked.warnings if "leave out" in w], checked.warnings


def test_a_parametrized_module_that_mixes_the_examples_rows_is_left_out_from_the_next_step_on():
    """The same check through the handler of a parametrized module (its refusal is its replay's)."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = MoE(mixing=True)
    parametrizations.weight_norm(model.mixing)
    batches = [((torch.randint(0, 11, (B, T)),), torch.randint(0, 3, (B,))) for _ in range(3)]
    _, (first, second, third) = watched_steps(model, batches)
    assert first.per_sample_sq_norms is None
    left = {"mixing.parametrizations.weight.original0", "mixing.parametrizations.weight.original1"}
    for later in (second, third):
        assert later.per_sample_sq_norms is not None and set(later.per_sample_uncovered) == left


class InsideRouter(nn.Module):
    """A router called on the (B, T, d) hidden states that flattens them itself (DeepSeek-V3's
    ``hidden_states.view(-1, d)``): (B T, E) rows out of a batch-first input; ``position_major`` flattens
    the positions first instead (T B rows), which no split by example order can serve."""

    def __init__(self, position_major: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D) / 2)
        self.position_major = position_major

    def forward(self, h):
        x = h.transpose(0, 1) if self.position_major else h
        return F.linear(x.reshape(-1, D), self.weight).softmax(-1)


class InsideNet(nn.Module):
    def __init__(self, position_major: bool = False):
        super().__init__()
        self.embed, self.head = nn.Embedding(11, D), nn.Linear(E, 3)
        self.router = InsideRouter(position_major)

    def forward(self, ids):
        p = self.router(self.embed(ids))
        rows = p.reshape(T, -1, E).transpose(0, 1) if self.router.position_major else p.reshape(-1, T, E)
        return self.head(rows.mean(1))


def test_rows_flattened_inside_the_module_are_exact(device):
    """The shape probe sees a batch-first input; the output's rows are made inside the call: each example's
    rows replayed alone and checked against the call's own."""
    torch.manual_seed(0)
    checked = assert_matches_loop(
        InsideNet(), torch.randint(0, 11, (B, T)), torch.randint(0, 3, (B,)), nn.CrossEntropyLoss(), device=device
    )
    assert "router.weight" in checked.record.per_sample_sq_norms_by_param
    assert not [w for w in checked.warnings if "leave out" in w], checked.warnings


def test_rows_flattened_positions_first_inside_the_module_are_left_out_not_wrong():
    torch.manual_seed(0)
    batches = [((torch.randint(0, 11, (B, T)),), torch.randint(0, 3, (B,))) for _ in range(2)]
    said, (first, second) = watched_steps(InsideNet(position_major=True), batches)
    assert first.per_sample_sq_norms is None and any("example by example" in n for n in first.notes), first.notes
    assert "router.weight" in second.per_sample_uncovered
    assert second.per_sample_sq_norms is not None


def test_hugging_face_deepseek_v3_router_is_served():
    """DeepSeek-V3's router flattens the (B, T, d) hidden states itself: its weight is served with the rest."""
    import transformers

    config = transformers.DeepseekV3Config(
        vocab_size=40, hidden_size=16, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, n_shared_experts=1,
        n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1, first_k_dense_replace=1, use_cache=False,
        pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    config._experts_implementation = "eager"  # (grouped_mm has no float64 kernel for the loop)
    torch.manual_seed(0)

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = transformers.DeepseekV3ForCausalLM(config)

        def forward(self, ids):
            return self.m(input_ids=ids).logits[:, -1]

    model = Last()
    ids, y = torch.randint(1, 40, (B, 6)), torch.randint(0, 40, (B,))
    checked = assert_matches_loop(model, ids, y, nn.CrossEntropyLoss())
    assert "m.model.layers.1.mlp.gate.weight" in checked.record.per_sample_sq_norms_by_param
    assert not [w for w in checked.warnings if "leave out" in w], checked.warnings


class GroupedExperts(nn.Module):
    """Llama 4's experts: the (B T, d) tokens repeated once per expert and scaled by their router scores
    (rows (E, B T): expert-major), each expert's block run through its own weights by one bmm."""

    def __init__(self):
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(E, D, 8) / 2)
        self.down = nn.Parameter(torch.randn(E, 4, D) / 2)

    def forward(self, h):
        h = h.view(E, -1, D)
        gate, up = torch.bmm(h, self.gate_up).chunk(2, dim=-1)
        return torch.bmm(F.silu(gate) * up, self.down).view(-1, D)


class GroupedMoE(nn.Module):
    """The experts' rows laid out as ``layout`` says: "experts" (E, B T) as Llama 4; "positions" (E, T, B),
    positions first within each expert's block (groups of one row: E T of them); "sorted" by a value of
    the tokens (an order that depends on the data: no grouping of examples gives it)."""

    def __init__(self, layout: str = "experts"):
        super().__init__()
        self.embed, self.head = nn.Embedding(11, D), nn.Linear(D, 3)
        self.router, self.experts = nn.Linear(D, E, bias=False), GroupedExperts()
        self.layout = layout

    def forward(self, ids):
        b = ids.shape[0]
        h = self.embed(ids).reshape(-1, D)  # (B T, d)
        scores = torch.sigmoid(self.router(h))  # (B T, E)
        if self.layout == "experts":  # as Llama 4: (E B T, d), the tokens once per expert
            routed = h.repeat(E, 1) * scores.T.reshape(-1, 1)
            out = self.experts(routed).view(E, -1, D).sum(0)
        elif self.layout == "positions":
            per = h.view(b, -1, D).transpose(0, 1).reshape(-1, D)  # (T B, d)
            gates = scores.view(b, -1, E).transpose(0, 1).reshape(-1, E)
            routed = per.repeat(E, 1) * gates.T.reshape(-1, 1)
            out = self.experts(routed).view(E, -1, b, D).sum(0).transpose(0, 1).reshape(-1, D)
        else:
            order = h[:, 0].argsort()
            routed = h[order].repeat(E, 1) * scores[order].T.reshape(-1, 1)
            out = torch.empty_like(h).index_copy(0, order, self.experts(routed).view(E, -1, D).sum(0))
        return self.head((h + out).reshape(b, -1, D).mean(1))


@pytest.mark.parametrize("layout", ["experts", "positions"])
def test_rows_grouped_by_expert_are_exact(device, layout):
    """(E, B T) rows (every example's tokens once per expert), or (E T, B): each example's rows replayed
    alone, in the call's order, checked against the call's own rows."""
    torch.manual_seed(0)
    checked = assert_matches_loop(
        GroupedMoE(layout), torch.randint(0, 11, (B, T)), torch.randint(0, 3, (B,)), nn.CrossEntropyLoss(),
        device=device,
    )  # fmt: skip
    assert {"experts.gate_up", "experts.down"} <= set(checked.record.per_sample_sq_norms_by_param)
    assert not [w for w in checked.warnings if "leave out" in w], checked.warnings


def test_rows_in_no_grouping_of_examples_are_left_out_not_wrong():
    torch.manual_seed(0)
    batches = [((torch.randint(0, 11, (B, T)),), torch.randint(0, 3, (B,)))]
    said, (rec,) = watched_steps(GroupedMoE("sorted"), batches)
    assert {"experts.gate_up", "experts.down"} <= set(rec.per_sample_uncovered)
    assert any("another order than example by example or grouped" in m for m in said), said


def test_hugging_face_llama4_experts_are_served():
    """Llama 4's MoE (its experts take the tokens repeated once per expert, expert-major): every parameter
    served, exact against the float64 loop."""
    import transformers

    config = transformers.Llama4TextConfig(
        vocab_size=40, hidden_size=16, intermediate_size=16, intermediate_size_mlp=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
        max_position_embeddings=32, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)

    model = M.LastLogits(transformers.Llama4ForCausalLM(config))
    ids, targets = torch.randint(1, 40, (B, 6)), torch.randint(0, 40, (B,))
    checked = assert_matches_loop(model, ids, targets, nn.CrossEntropyLoss())
    assert set(checked.record.per_sample_sq_norms_by_param) == {n for n, _ in model.named_parameters()}
    assert not [w for w in checked.warnings if "leave out" in w], checked.warnings


class ExpertMLP(nn.Module):
    """DBRX's expert MLP: holds every expert's weights, called once per expert on the tokens routed to it with
    that expert's slices passed in (rows whose number and order follow the routing)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(E * 4, D) / 2)
        self.w2 = nn.Parameter(torch.randn(E * 4, D) / 2)

    def forward(self, x, w1, w2):
        return F.silu(x @ w1.T) @ w2


class RoutedExperts(nn.Module):
    def __init__(self, mixing: bool = False):
        super().__init__()
        self.mlp, self.mixing = ExpertMLP(), mixing

    def forward(self, h, idx, weights):  # h (B, T, d); idx, weights (B T, K)
        flat = h.reshape(-1, D)
        out = torch.zeros_like(flat)
        for e in range(E):
            token, slot = torch.where(idx == e)
            w1, w2 = self.mlp.w1.view(E, 4, D)[e], self.mlp.w2.view(E, 4, D)[e]
            out = out.index_add(0, token, self.mlp(flat[token], w1, w2) * weights[token, slot, None])
        if self.mixing:  # a statistic over every token of the batch: the examples are mixed
            out = out / out.norm()
        return out.view(h.shape)


class RoutedMoE(nn.Module):
    def __init__(self, mixing: bool = False):
        super().__init__()
        self.embed, self.head = nn.Embedding(11, D), nn.Linear(D, 3)
        self.router, self.experts = Router(), RoutedExperts(mixing)

    def forward(self, ids):
        x = self.embed(ids)
        _, weights, idx = self.router(x.reshape(-1, D))
        x = x + self.experts(x, idx, weights)
        return self.head(x.mean(1))


def test_a_layer_called_on_routed_rows_is_served_by_its_parent_from_the_next_step():
    """DBRX's shape: the expert MLP's rows follow the routing (no axis of examples); its parameters are left
    out on the first step with the reason, then served as bare parameters of its parent, replayed on each
    example's rows ((B, T, d) states beside (B T, k) routing indices), exact against the float64 loop."""
    torch.manual_seed(0)
    ids, y = torch.randint(0, 11, (B, T)), torch.randint(0, 3, (B,))
    checked = assert_matches_loop(RoutedMoE(), ids, y, nn.CrossEntropyLoss(), warmup=1)
    assert {"experts.mlp.w1", "experts.mlp.w2"} <= set(checked.record.per_sample_sq_norms_by_param)
    said = " ".join(checked.warnings)
    assert "cannot find the batch axis in the output gradient of ExpertMLP" in said  # (the first step)
    assert "served as bare parameters of RoutedExperts" in said


def test_a_parent_that_mixes_the_examples_rows_leaves_the_routed_layer_out():
    torch.manual_seed(0)
    batches = [((torch.randint(0, 11, (B, T)),), torch.randint(0, 3, (B,))) for _ in range(3)]
    said, records = watched_steps(RoutedMoE(mixing=True), batches)
    assert all({"experts.mlp.w1", "experts.mlp.w2"} <= set(r.per_sample_uncovered or {}) for r in records[2:])
    assert any("does not compute them example by example" in m for m in said), said


def test_hugging_face_dbrx_experts_are_served_from_the_second_step():
    import transformers

    config = transformers.DbrxConfig(
        vocab_size=40, d_model=16, n_heads=2, n_layers=1, max_seq_len=32, use_cache=False, pad_token_id=0,
        ffn_config={"ffn_hidden_size": 8, "moe_num_experts": 4, "moe_top_k": 2},
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
    )  # fmt: skip
    torch.manual_seed(0)

    model = M.LastLogits(transformers.DbrxForCausalLM(config))
    ids, targets = torch.randint(1, 40, (B, 6)), torch.randint(0, 40, (B,))
    checked = assert_matches_loop(model, ids, targets, nn.CrossEntropyLoss(), warmup=1)
    assert set(checked.record.per_sample_sq_norms_by_param) == {n for n, _ in model.named_parameters()}
