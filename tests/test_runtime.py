"""The SPECTRA runtime (issue 3): Sinkhorn, batch invariance, causality, cache-exact generation, save/load.

Structural tests on tiny random-weight configs of real architectures (llama, gpt2, mixtral, qwen2_moe):
their weights are random, so they test mechanics, not quality.
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from spectra_convert.modeling import modeling_spectra
from spectra_convert.modeling.configuration_spectra import SpectraConfig
from spectra_convert.modeling.modeling_spectra import (
    SpectraCache,
    SpectraForCausalLM,
    SpectraRouter,
    SequenceGRU,
    sinkhorn,
)
from tests.conftest import run_without_package, tiny_parent_config

PARENTS = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "mixtral", "qwen2_moe"]


def build(model_type: str = "llama", seed: int = 0, **knobs) -> SpectraForCausalLM:
    torch.manual_seed(seed)
    parent = tiny_parent_config(model_type)
    spectra = {"num_experts": 4, "top_k": 2, "router_dim": 16, **knobs}
    model = SpectraForCausalLM(SpectraConfig(text_config=parent.to_dict(), spectra=spectra))
    # Non-zero biases so that selection actually depends on them.
    with torch.no_grad():
        for router in model.routers():
            router.dual_bias.normal_(0, 0.3)
    return model.eval()


def selections(model: SpectraForCausalLM, **inputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(selected experts, router logits) per layer, reshaped [B, T, ...]."""
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [r.register_forward_hook(lambda m, a, out: captured.append((out[0], out[2]))) for r in model.routers()]
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    batch, steps = inputs["input_ids"].shape
    return ([s.view(batch, steps, -1) for _, s in captured], [lg.view(batch, steps, -1) for lg, _ in captured])


# -- Sinkhorn ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sinkhorn_marginals(k: int) -> None:
    torch.manual_seed(0)
    logits = torch.randn(96, 8) * 2.0
    plan, potentials = sinkhorn(logits, k, iters=200)
    assert torch.allclose(plan.sum(dim=1), torch.full((96,), float(k)), atol=1e-4)
    assert torch.allclose(plan.sum(dim=0), torch.full((8,), 96 * k / 8), atol=1e-4)
    assert potentials.shape == (8,) and abs(float(potentials.mean())) < 1e-5


def test_sinkhorn_potentials_balance_the_argmax() -> None:
    """Ranking logits + g per token is how the plan ranks experts: a skewed score matrix gets balanced."""
    torch.manual_seed(1)
    logits = torch.randn(512, 8) + torch.linspace(0, 3, 8)  # strong preference for the last experts
    _, g = sinkhorn(logits, 2, iters=100)
    before = torch.bincount(torch.topk(logits, 2).indices.flatten(), minlength=8).float()
    after = torch.bincount(torch.topk(logits + g, 2).indices.flatten(), minlength=8).float()
    assert (after.std() / after.mean()) < 0.5 * (before.std() / before.mean())


# -- batch invariance and causality ----------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "mixtral"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_dual_bias_routing_is_batch_invariant(model_type: str, side: str) -> None:
    model = build(model_type)
    torch.manual_seed(2)
    alone = torch.randint(3, 128, (1, 9))
    others = torch.randint(3, 128, (2, 16))
    pad = torch.zeros(1, 16 - 9, dtype=torch.long)
    row = torch.cat([pad, alone], 1) if side == "left" else torch.cat([alone, pad], 1)
    batch = torch.cat([row, others])
    mask = torch.ones_like(batch)
    real = slice(16 - 9, 16) if side == "left" else slice(0, 9)
    mask[0] = 0
    mask[0, real] = 1
    sel_alone, log_alone = selections(model, input_ids=alone, attention_mask=torch.ones_like(alone))
    # Positions follow the mask, as generate() computes them (gpt2 has absolute positions).
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    sel_batch, log_batch = selections(model, input_ids=batch, attention_mask=mask, position_ids=positions)
    for layer in range(len(sel_alone)):
        assert torch.equal(sel_alone[layer][0], sel_batch[layer][0, real]), f"layer {layer} selection changed"
        assert torch.allclose(log_alone[layer][0], log_batch[layer][0, real], atol=1e-5)


def test_in_batch_mode_is_not_batch_invariant() -> None:
    """Paper-literal Sinkhorn across the batch: the same text gets other experts next to other texts.

    This is why ``dual_bias`` is the default: an ``in_batch`` model's output depends on batch composition.
    """
    model = build("llama", balance_mode="in_batch")
    torch.manual_seed(3)
    text = torch.randint(3, 128, (1, 24))
    crowd = torch.randint(3, 128, (7, 24))
    sel_alone, _ = selections(model, input_ids=text)
    sel_batch, _ = selections(model, input_ids=torch.cat([text, crowd]))
    changed = sum(int((a[0] != b[0]).any(-1).sum()) for a, b in zip(sel_alone, sel_batch))
    assert changed > 0


def test_routing_is_causal() -> None:
    model = build("llama")
    torch.manual_seed(4)
    ids = torch.randint(3, 128, (1, 20))
    changed = ids.clone()
    changed[0, 12:] = torch.randint(3, 128, (8,))
    sel_a, log_a = selections(model, input_ids=ids)
    sel_b, log_b = selections(model, input_ids=changed)
    for a, b, la, lb in zip(sel_a, sel_b, log_a, log_b):
        assert torch.equal(a[:, :12], b[:, :12])
        assert torch.allclose(la[:, :12], lb[:, :12], atol=1e-6)
    assert any(not torch.equal(a[:, 12:], b[:, 12:]) for a, b in zip(sel_a, sel_b))


# -- generation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", PARENTS)
def test_cached_generation_equals_uncached(model_type: str) -> None:
    model = build(model_type)
    prompt = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without_cache = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.sequences.shape[1] == 7 + 32
    assert torch.equal(with_cache.sequences, without_cache.sequences)
    # Same tokens could hide different routing (tiny random models repeat tokens): logits must agree too.
    for step_cached, step_full in zip(with_cache.logits, without_cache.logits):
        assert torch.allclose(step_cached, step_full, atol=1e-4)


def test_left_padded_batch_generation_matches_single() -> None:
    model = build("llama")
    torch.manual_seed(6)
    short, long = torch.randint(3, 128, (1, 5)), torch.randint(3, 128, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kwargs)
    alone = model.generate(short, **kwargs)
    assert torch.equal(together[0, 4:], alone[0])


def test_incremental_decode_logits_equal_full_forward() -> None:
    model = build("llama")
    ids = torch.randint(3, 128, (2, 18), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = SpectraCache(config=model.config.text_config)
        out = model(ids[:, :10], past_key_values=cache, use_cache=True)
        steps = [out.logits]
        for t in range(10, 18):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)
    assert set(cache.spectra_router_states) == {0, 1}


def test_beam_search_runs_and_reorders_router_state() -> None:
    model = build("llama")
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(8))
    out = model.generate(prompt, num_beams=3, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 14)
    cache = SpectraCache(config=model.config.text_config)
    cache.spectra_router_states[0] = torch.arange(3.0).unsqueeze(1)
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert cache.spectra_router_states[0].flatten().tolist() == [2.0, 2.0, 0.0]


def test_output_router_logits_shapes() -> None:
    model = build("mixtral")
    ids = torch.randint(3, 128, (2, 5))
    out = model(ids, output_router_logits=True)
    assert len(out.router_logits) == 2
    assert out.router_logits[0].shape == (10, 4)


# -- training signal -------------------------------------------------------------------------------------------


def test_gradients_reach_gru_projector_and_expert_vectors() -> None:
    model = build("llama").train()
    ids = torch.randint(3, 128, (2, 12))
    out = model(ids, labels=ids, output_router_logits=True)
    assert out.aux_loss is not None and out.aux_loss > 0
    out.loss.backward()
    for router in model.routers():
        for name in ("gru.weight_ih_l0", "gru.weight_hh_l0", "projector", "expert_vectors"):
            grad = router.get_parameter(name).grad
            assert grad is not None and grad.abs().sum() > 0, name


def _shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


@pytest.mark.parametrize("training", [False, True])
def test_loss_is_the_lm_loss_unless_router_logits_are_asked_for(training: bool) -> None:
    """transformers' MoE convention: ``loss`` with labels alone is the LM loss (perplexity, HF Trainer, lm-eval
    read it); the router aux loss is returned and added times ``router_aux_loss_coef`` only with
    ``output_router_logits=True``."""
    model = build("llama", router_aux_loss_coef=0.5).train(training)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(13))
    labels = ids.clone()
    labels[0, :4] = -100  # ignored positions stay ignored
    seen: list[object] = []
    hooks = [r.register_forward_hook(lambda m, a, o: seen.append(m.context.records)) for r in model.routers()]
    plain = model(ids, labels=labels)
    for hook in hooks:
        hook.remove()
    assert plain.aux_loss is None and plain.router_logits is None
    assert seen == [None, None]  # nothing recorded for an aux loss nobody asked for
    assert torch.allclose(plain.loss, _shifted_cross_entropy(plain.logits, labels), atol=1e-6)

    with_aux = model(ids, labels=labels, output_router_logits=True)
    lm = _shifted_cross_entropy(with_aux.logits, labels)
    assert with_aux.aux_loss is not None and with_aux.aux_loss > 0
    assert torch.allclose(with_aux.loss, lm + 0.5 * with_aux.aux_loss, atol=1e-6)
    assert len(with_aux.router_logits) == 2
    defaults = SpectraConfig().spectra  # today's training loss: lm + 1 * (0.1 entropy + 0.01 orthogonality)
    assert (defaults["router_aux_loss_coef"], defaults["router_entropy_coef"], defaults["ortho_loss_coef"]) == (
        1.0, 0.1, 0.01)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "aten"])
def test_sequence_gru_states_are_nn_grus_and_its_backward_is_autograds(compiled: bool, monkeypatch) -> None:
    """The training GRU path: states those of ``nn.GRU`` (ATen's loop: bit-identical; the compiled loop: the same
    equations in another summation order), gradients equal to autograd's (float64)."""
    monkeypatch.setattr(modeling_spectra, "COMPILED_RECURRENCE", compiled)
    torch.manual_seed(14)
    gru = torch.nn.GRU(24, 8, batch_first=True).double()
    x = torch.randn(3, 17, 24, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 17, 8, dtype=torch.float64)
    assert (modeling_spectra.compiled_loops_for(x, h0, *gru.parameters()) is not None) is compiled
    expected, _ = gru(x, h0.unsqueeze(0))
    reference = torch.autograd.grad((expected * upstream).sum(), [x, h0, *gru.parameters()])
    states = SequenceGRU.apply(x, h0, gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)
    if compiled:
        assert torch.allclose(states, expected, rtol=0, atol=1e-14)
    else:
        assert torch.equal(states, expected)
    grads = torch.autograd.grad((states * upstream).sum(), [x, h0, *gru.parameters()])
    for ours, theirs in zip(grads, reference):
        assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-12)


def test_compiled_recurrence_is_nn_grus_row_by_row_at_router_size() -> None:
    """Real SmolLM2 router sizes in float32: states within 1e-5 of ``nn.GRU`` over 200 steps, and a row's states do
    not change by one bit when other rows share its call (the loop runs row by row; batch invariance)."""
    torch.manual_seed(17)
    gru = torch.nn.GRU(576, 128, batch_first=True)
    weights = [p.detach() for p in gru.parameters()]
    x, h0 = torch.randn(3, 200, 576), torch.randn(3, 128) * 0.5
    loops = modeling_spectra.compiled_loops_for(x, h0, *weights)
    assert loops is not None
    gates_in = torch.nn.functional.linear(x, weights[0], weights[2])
    together = torch.empty(3, 200, 128)
    loops[0](gates_in.numpy(), h0.numpy(), weights[1].t().contiguous().numpy(), weights[3].numpy(), together.numpy())
    with torch.no_grad():
        expected, _ = gru(x, h0.unsqueeze(0))
    assert (together - expected).abs().max() < 1e-5
    for row in range(3):
        alone = torch.empty(1, 200, 128)
        loops[0](gates_in[row : row + 1].contiguous().numpy(), h0[row : row + 1].numpy(),
                 weights[1].t().contiguous().numpy(), weights[3].numpy(), alone.numpy())
        assert torch.equal(alone[0], together[row])


def test_the_compiled_loops_sigmoid_is_within_1e_12_of_the_exact_function() -> None:
    """The polynomial sigmoid the compiled GRU loop uses for its gates (so that they vectorise) against the exact
    function over the whole clamped range and beyond, compiled by numba (the loop inlines the same code and may
    also fuse its multiply-adds, which only rounds less)."""
    assert modeling_spectra.compiled_loops_for(torch.zeros(1)) is not None
    for x in torch.linspace(-45, 45, 9001, dtype=torch.float64).tolist():
        exact, ours = 1.0 / (1.0 + math.exp(-x)), modeling_spectra._sigmoid64(x)
        assert abs(ours - exact) < 1e-12, x
        assert abs(x) > 30 or abs(ours - exact) < 1e-9 * exact, x  # relative, where the clamp does not act


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "aten"])
def test_one_token_gru_step_is_bit_identical_to_nn_gru_on_strided_inputs(compiled: bool, monkeypatch) -> None:
    """Decoding runs ATen's GRU cell instead of the sequence path (also where several tokens run the compiled
    loop); states must not move by one bit against ``nn.GRU``, also when the token and the cached state are
    strided views (a batch's column, a slice of the router-state row), and stay within float rounding of the
    compiled loop. Real SmolLM2 router sizes: at small sizes strided and contiguous GEMMs happen to agree."""
    monkeypatch.setattr(modeling_spectra, "COMPILED_RECURRENCE", compiled)
    torch.manual_seed(16)
    knobs = {**SpectraConfig().spectra, "num_experts": 8, "top_k": 2, "router_dim": 128}
    router = SpectraRouter(576, knobs, layer_idx=0).eval()
    x = torch.randn(3, 9, 576)
    state_row = torch.randn(3, 128 + 9)  # [GRU state | running totals], as the cache stores it
    weights = [p.detach() for p in router.gru.parameters()]
    for t in range(9):
        token, h0 = x[:, t : t + 1], state_row[:, :128]
        with torch.no_grad():
            expected, expected_last = router.gru(token, h0.unsqueeze(0).contiguous())
            states, last = router._run_gru(token, h0)
            looped = modeling_spectra.compiled_gru(token.contiguous(), h0.contiguous(), *weights,
                                                   modeling_spectra._compile_loops()[0])
        assert torch.equal(states, expected) and torch.equal(last, expected_last[0])
        assert (looped - states).abs().max() < 1e-6


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "aten"])
def test_experts_keep_the_callers_threads_and_only_the_recurrence_runs_on_one(compiled: bool,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding steps are bandwidth-bound GEMVs, which two threads read about twice as fast, so experts keep the
    caller's threads at any length; a multi-token GRU recurrence (hundreds of tiny steps) runs on one thread (the
    compiled loop is one thread by construction: ATen's loop is never called), and the caller's setting is back
    after every call (docs/ARCHITECTURE.md, "Runtime speed")."""
    monkeypatch.setattr(modeling_spectra, "COMPILED_RECURRENCE", compiled)
    model = build("llama")
    experts = model.model.layers[0].mlp.experts
    inside: list[int] = []
    recurrence: list[int] = []
    real_gru = torch._VF.gru

    def gru_spy(*args: object) -> object:
        recurrence.append(torch.get_num_threads())
        return real_gru(*args)

    monkeypatch.setattr(torch._VF, "gru", gru_spy)
    hook = experts.act_fn.register_forward_pre_hook(lambda m, a: inside.append(torch.get_num_threads()))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            model(torch.randint(3, 128, (1, 1)))
            assert set(inside) == {2} and recurrence == []
            inside.clear()
            model(torch.randint(3, 128, (2, 40)))
        assert set(inside) == {2} and torch.get_num_threads() == 2
        assert recurrence == [] if compiled else (recurrence and set(recurrence) == {1})
    finally:
        hook.remove()
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind, inter, k, dtype", [("gated", 168, 4, torch.float32), ("gated", 1536, 2, torch.float32),
                                                   ("mlp", 512, 2, torch.float32), ("gated", 168, 4, torch.bfloat16)])
def test_one_token_experts_equal_the_sorted_dispatch_bit_for_bit(kind: str, inter: int, k: int, dtype: torch.dtype) -> None:
    """A decoding step skips the sort/gather/scatter (and multiplies by its weights as Python floats, skipping
    weight 1); the sum must be the dispatch's, to the bit (SmolLM2 sizes: carved slices, copy experts; a
    gpt2-style expert with biases; bf16, where a weight is rounded to the activations' dtype first)."""
    from spectra_convert.modeling.modeling_spectra import SpectraExperts

    torch.manual_seed(17)
    experts = SpectraExperts(8, 576, inter, kind, "silu" if kind == "gated" else "gelu_new").to(dtype)
    with torch.no_grad():
        if kind == "mlp":
            experts.up_bias.normal_()
            experts.down_bias.normal_()
        for trial in range(20):
            x = (torch.randn(1, 576) * (1 + trial)).to(dtype)
            selected = torch.randperm(8)[:k].unsqueeze(0)
            weights = torch.rand(1, k) if trial % 2 else torch.rand(1, k).index_fill_(1, torch.tensor([0]), 1.0)
            assert torch.equal(experts(x, selected, weights), experts.dispatch(x, selected, weights))


@pytest.mark.parametrize("kind, act", [("gated", "silu"), ("mlp", "gelu_new"), ("gated", "gelu_new")])
@pytest.mark.parametrize("train_base", [False, True])
def test_recorded_dispatch_has_the_loops_values_and_autograds_gradients(kind: str, act: str, train_base: bool) -> None:
    """A fine-tuning step dispatches through ``SortedExpertsFunction`` (hand-written backward). Its outputs must
    be the no-grad dispatch's to the bit, and every gradient -- tokens, routing weights, LoRA factors, and the
    expert tensors when they train -- autograd's through ``SpectraExperts.expert`` token by token (an expert
    that gets no token must get zero gradients). The SiLU path uses ATen's backward, others the activation's."""
    from spectra_convert.modeling.modeling_spectra import SpectraExperts

    torch.manual_seed(5)
    experts = SpectraExperts(8, 48, 40, kind, act)
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0.0, 0.3)
    experts.requires_grad_(train_base)
    names = ("gate_up_proj", "down_proj") if kind == "gated" else ("up_proj", "down_proj")
    low_rank = {name: [(torch.randn(8, getattr(experts, name).shape[1], 4, requires_grad=True),
                        torch.randn(8, 4, getattr(experts, name).shape[2], requires_grad=True), 0.5)] for name in names}
    x = torch.randn(24, 48, requires_grad=True)
    selected = torch.stack([torch.randperm(7)[:2] for _ in range(24)])  # expert 7 gets no token
    weights = torch.rand(24, 2, requires_grad=True)
    leaves = [x, weights] + [t for name in names for lhs, rhs, _ in low_rank[name] for t in (lhs, rhs)]
    leaves += list(experts.parameters()) if train_base else []

    out = experts(x, selected, weights, low_rank=low_rank)
    with torch.no_grad():
        assert torch.equal(out, experts(x, selected, weights, low_rank=low_rank))
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, upstream, allow_unused=True)

    tensors = experts.expert_weights(low_rank)
    reference = torch.stack([sum(weights[n, j] * experts.expert(int(selected[n, j]), x[n:n + 1], tensors)[0]
                                 for j in range(2)) for n in range(24)])
    want = torch.autograd.grad(reference, leaves, upstream, allow_unused=True)
    for name, a, b in zip(["x", "weights"] + [f"leaf{i}" for i in range(len(leaves))], got, want):
        b = torch.zeros_like(a) if b is None else b
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (name, (a - b).abs().max())
    assert got[2][7].abs().max() == 0  # the unused expert's factor


def test_cached_expert_geometry_follows_parameter_updates() -> None:
    """Without autograd the unit expert vectors and the repulsion matrix are reused between calls; any in-place
    update of the expert vectors (an optimizer step, ``load_state_dict``, ``.data``) must reach the next call."""
    model = build("llama", repulsion=0.5)
    router = model.routers()[0]
    hidden = torch.randn(1, 6, router.hidden_size)
    with torch.no_grad():
        before = router(hidden)[0]
        router.expert_vectors.copy_(torch.randn_like(router.expert_vectors))
        after = router(hidden)[0]
        fresh = SpectraRouter(router.hidden_size, model.config.spectra, layer_idx=0)
        fresh.load_state_dict(router.state_dict())
        assert not torch.equal(before, after)
        assert torch.equal(after, fresh.eval()(hidden)[0])
        router.load_state_dict({**router.state_dict(), "expert_vectors": torch.randn_like(router.expert_vectors)})
        fresh.load_state_dict(router.state_dict())
        assert torch.equal(router(hidden)[0], fresh(hidden)[0])
        router.expert_vectors.data.normal_()  # an edit that version counters do not see
        fresh.load_state_dict(router.state_dict())
        assert torch.equal(router(hidden)[0], fresh(hidden)[0])
        routed = router(hidden)[0]
        router.unit_expert_vectors().zero_()  # a caller's copy: changing it must not reach the reused geometry
        assert torch.equal(router(hidden)[0], routed)


@pytest.mark.parametrize("mask_row", [False, True])
def test_training_forward_routes_and_computes_exactly_like_inference(mask_row: bool) -> None:
    """Under autograd the router takes the SequenceGRU path; routing and logits must not move by one bit."""
    model = build("llama", bias_ema=0.0, bias_update_rate=0.0)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(15))
    mask = torch.ones_like(ids)
    if mask_row:
        mask[0, :5] = 0
    sel_eval, log_eval = selections(model, input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        logits_eval = model(ids, attention_mask=mask, use_cache=False).logits
    model.train()
    captured: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda m, a, out: captured.append(out[2])) for r in model.routers()]
    logits_train = model(ids, attention_mask=mask, use_cache=False).logits
    for hook in hooks:
        hook.remove()
    assert logits_train.requires_grad
    assert all(torch.equal(a.reshape(-1, 2), b) for a, b in zip(sel_eval, captured))
    assert torch.equal(logits_train.detach(), logits_eval)


def test_training_updates_dual_bias_from_sinkhorn() -> None:
    model = build("llama").train()
    before = [r.dual_bias.clone() for r in model.routers()]
    model(torch.randint(3, 128, (2, 12)))
    assert all(not torch.equal(b, r.dual_bias) for b, r in zip(before, model.routers()))


# -- config errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spectra,field",
    [({"top_k": 9, "num_experts": 8}, "top_k"), ({"router_dim": 0}, "router_dim"), ({"num_experts": 1}, "num_experts")],
)
def test_bad_config_names_the_field(spectra: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SpectraConfig(text_config=tiny_parent_config("llama").to_dict(), spectra=spectra)


def test_unknown_parent_architecture() -> None:
    with pytest.raises(ValueError, match="text_config.model_type"):
        SpectraConfig(text_config={"model_type": "bert"})


# -- save / load without spectra_convert ------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "mixtral"])
def test_save_load_in_fresh_process_without_package(model_type: str, tmp_path) -> None:
    model = build(model_type)
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(9))
    torch.save({"ids": ids, "logits": model(ids).logits.detach()}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "SpectraForCausalLM"
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        with torch.no_grad():
            logits = model(expected["ids"]).logits
        diff = (logits - expected["logits"]).abs().max().item()
        assert diff < 1e-5, diff
        print("OK", diff)
        """
    )
    result = run_without_package(script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK" in result.stdout


def test_router_contract_three_items() -> None:
    router = SpectraRouter(32, {**SpectraConfig().spectra, "num_experts": 4, "router_dim": 8}, layer_idx=0)
    out = router(torch.randn(10, 32))
    assert isinstance(out, tuple) and len(out) == 3
    logits, weights, selected = out
    assert logits.shape == (10, 4) and weights.shape == (10, 2) and selected.shape == (10, 2)
    assert torch.allclose(weights.sum(-1), torch.ones(10))


def test_sequence_balance_spreads_a_skewed_sequence() -> None:
    """Tokens that all prefer one expert: the running-load correction spreads them within the sequence."""
    torch.manual_seed(10)
    knobs = {**SpectraConfig().spectra, "num_experts": 4, "router_dim": 8, "use_gru": False}
    loads = {}
    for beta in (0.0, 1.0):
        router = SpectraRouter(16, {**knobs, "sequence_balance": beta}, layer_idx=0).eval()
        torch.manual_seed(11)
        router.reset_parameters()
        h = torch.randn(1, 256, 16) + 0.5 * torch.randn(16)  # a shared direction skews every token
        _, _, selected = router(h)
        counts = torch.bincount(selected.flatten(), minlength=4).float()
        loads[beta] = float(counts.std(unbiased=False) / counts.mean())
    assert loads[1.0] < 0.75 * loads[0.0], loads


@pytest.mark.parametrize("compiled", [True, False])
def test_sequence_balance_counts_hard_choices_and_resumes_exactly_from_its_state(monkeypatch, compiled: bool) -> None:
    """The correction reads the sequence's own earlier top-k choices, committed every SEQUENCE_CHUNK real tokens:
    routing a sequence in one call, in pieces of any length that carry the state, or with pads anywhere gives the
    real tokens the same choices and ends in the same state (compiled loop and torch chunk loop alike; the compiled
    one for calls of any length here, so the short pieces reach it too)."""
    from spectra_convert.modeling.modeling_spectra import SEQUENCE_CHUNK

    monkeypatch.setattr(modeling_spectra, "COMPILED_RECURRENCE", compiled)
    monkeypatch.setattr(modeling_spectra, "COMPILED_SEQUENCE_MIN_STEPS", 1)

    torch.manual_seed(13)
    knobs = {**SpectraConfig().spectra, "num_experts": 4, "router_dim": 8, "use_gru": False, "sequence_balance": 2.0}
    router = SpectraRouter(16, knobs, layer_idx=0).eval()
    logits = torch.randn(3, 53, 4) * 3 + torch.tensor([2.0, 0.0, 0.0, -1.0])
    bias = torch.tensor([0.1, -0.2, 0.3, -0.2])
    whole, correction, state = router.sequence_select(logits, bias, None, None)
    # the first chunk has no committed tokens: no correction; the second reads the first chunk's choices exactly
    assert torch.equal(correction[:, :SEQUENCE_CHUNK], torch.zeros(3, SEQUENCE_CHUNK, 4))
    counts = torch.zeros(3, 4).scatter_add_(1, whole[:, :SEQUENCE_CHUNK].reshape(3, -1), torch.ones(3, 2 * SEQUENCE_CHUNK))
    expected = -2.0 * 4 * (counts / (SEQUENCE_CHUNK * 2) - 0.25)
    torch.testing.assert_close(correction[:, SEQUENCE_CHUNK], expected)
    assert state[:, -1].tolist() == [53.0] * 3 and state[:, :8].sum(1).tolist() == [106.0] * 3

    pieces, carried = [], None
    for lo, hi in [(0, 5), (5, 6), (6, 15), (15, 16), (16, 17), (17, 30), (30, 31), (31, 32), (32, 53)]:  # 1-token steps cross chunk ends
        part, _, carried = router.sequence_select(logits[:, lo:hi], bias, None, carried)
        pieces.append(part)
    assert torch.equal(torch.cat(pieces, 1), whole) and torch.equal(carried, state)

    mask = torch.ones(3, 60, dtype=torch.bool)
    mask[0, :7] = False  # left padding
    mask[1, [3, 20, 21, 40, 41, 42, 59]] = False  # pads inside and at the end
    mask[2, 53:] = False  # right padding
    padded = torch.randn(3, 60, 4)
    for row in range(3):
        padded[row, mask[row]] = logits[row]
    chosen, _, padded_state = router.sequence_select(padded, bias, mask, None)
    for row in range(3):
        n = int(mask[row].sum())
        assert torch.equal(chosen[row, mask[row]], whole[row, :n]), row
        reference = router.sequence_select(logits[row : row + 1, :n], bias, None, None)[2]
        assert torch.equal(padded_state[row : row + 1], reference), row


@pytest.mark.parametrize("experts,top_k,beta", [(4, 2, 2.0), (8, 2, 0.5), (6, 3, 0.3), (8, 5, 1.0)])
def test_compiled_sequence_loop_gives_the_torch_loops_bits(monkeypatch, experts: int, top_k: int, beta: float) -> None:
    """The compiled per-token loop (``_sequence_select_loop``, what a CPU prefill runs) returns the torch chunk
    loop's choices, corrections and state bit for bit: with pads anywhere, resuming from a state mid-chunk, and at
    a beta and E whose factors are not exact in binary."""
    torch.manual_seed(17)
    knobs = {**SpectraConfig().spectra, "num_experts": experts, "top_k": top_k, "router_dim": 8, "use_gru": False,
             "sequence_balance": beta}
    router = SpectraRouter(16, knobs, layer_idx=0).eval()
    logits = torch.randn(3, 77, experts) * 3 + torch.linspace(2, -2, experts)
    bias = torch.randn(experts) * 0.3
    mask = torch.ones(3, 77, dtype=torch.bool)
    mask[0, :9] = False
    mask[1, [3, 20, 21, 40, 60]] = False
    mask[2, 70:] = False
    resumed = torch.cat([torch.randint(0, 20, (3, 2 * experts)).float(), torch.tensor([[5.0], [16.0], [33.0]])], 1)
    assert modeling_spectra.compiled_sequence_select(logits) is not None
    assert logits.shape[1] >= modeling_spectra.COMPILED_SEQUENCE_MIN_STEPS  # long enough to take the compiled loop
    for pads in (None, mask):
        for state0 in (None, resumed):
            monkeypatch.setattr(modeling_spectra, "COMPILED_RECURRENCE", True)
            compiled = router.sequence_select(logits, bias, pads, state0)
            monkeypatch.setattr(modeling_spectra, "COMPILED_RECURRENCE", False)
            reference = router.sequence_select(logits, bias, pads, state0)
            for got, want in zip(compiled, reference):
                assert torch.equal(got, want), (pads is None, state0 is None)


def test_a_stronger_sequence_term_balances_more() -> None:
    """What the soft rule failed (stronger was worse, docs/ARCHITECTURE.md "The sequence-balance term"): with
    hard counts, load CV of a skewed batch falls as beta grows."""
    torch.manual_seed(14)
    knobs = {**SpectraConfig().spectra, "num_experts": 8, "router_dim": 8, "use_gru": False}
    logits = torch.randn(8, 256, 8) * 4 + torch.linspace(3, -3, 8)
    cvs = []
    for beta in (0.5, 1.0, 2.0, 4.0):
        router = SpectraRouter(16, {**knobs, "sequence_balance": beta}, layer_idx=0).eval()
        counts = torch.bincount(router.select(logits, torch.zeros(8)).flatten(), minlength=8).float()
        cvs.append(float(counts.std(unbiased=False) / counts.mean()))
    assert all(b < a for a, b in zip(cvs, cvs[1:])), cvs


def test_sequence_balance_state_is_per_sequence_and_causal() -> None:
    """The running loads of one sequence never leak into another row of the batch."""
    model = build("llama", sequence_balance=2.0)
    torch.manual_seed(12)
    a, b = torch.randint(3, 128, (1, 16)), torch.randint(3, 128, (1, 16))
    sel_a, _ = selections(model, input_ids=a)
    sel_ab, _ = selections(model, input_ids=torch.cat([a, b]))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(sel_a, sel_ab))


# -- PEFT LoRA on the fused expert tensors (issue 22) ---------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_unmerged_expert_lora_applies_its_factors_per_expert_and_equals_the_merged_model(model_type: str) -> None:
    """PEFT's ``target_parameters`` LoRA folds ``s * B @ A`` into the whole [E, out, in] stack every forward;
    the MoE block reads the factors (``peft_expert_lora``) and the experts apply them to their own rows instead.
    Same function: unmerged logits == merged logits, gradients reach the factors, and no full delta is ever
    built (no parametrization is evaluated, not even PEFT's per-call registration check)."""
    from peft import LoraConfig, get_peft_model
    from torch.nn.utils import parametrize

    from spectra_convert.finetune.modes import lora_candidates

    model = build(model_type)
    _, expert_params = lora_candidates(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_parameters=expert_params))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # B starts at zero: make the adapter change the function
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))

    # Count every evaluation of a parametrization (the fold of a whole [E, out, in] stack): none, not even the
    # one torch's consistency check makes when PEFT's own forward registers its parametrization per call.
    reads: list[str] = []
    original_get = parametrize.ParametrizationList.forward

    def counting_forward(self, *args, **kwargs):
        reads.append("full")
        return original_get(self, *args, **kwargs)

    parametrize.ParametrizationList.forward = counting_forward
    try:
        peft_model.train()
        out = peft_model(input_ids=ids, labels=ids)
        out.loss.backward()
    finally:
        parametrize.ParametrizationList.forward = original_get
    assert reads == [], "a folded [E, out, in] tensor was built instead of applying the factors to the routed rows"
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n or "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)

    peft_model.eval()
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids).logits
        peft_model.merge_adapter()  # merged in place, wrappers kept: the factors must not be applied twice
        merged_in_place = peft_model(input_ids=ids).logits
        peft_model.unmerge_adapter()
        merged = peft_model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged_in_place, merged, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(unmerged, plain, atol=1e-3), "the adapter must change the logits in this test"
    torch.testing.assert_close(unmerged, merged, atol=1e-5, rtol=1e-4)


def test_a_router_replaced_by_a_deep_copy_gets_the_models_routing_context() -> None:
    """Wrappers such as PEFT's ``modules_to_save`` put deep copies of routers in place, context included; the
    model re-points them at its own routing context on the next forward, also after an earlier forward cached its
    router list (without that, the copy would decode without its cached state)."""
    import copy

    model = build("llama", seed=3)
    prompt = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(prompt)  # caches the router list
        layer = model.model.layers[1]
        layer.mlp.gate = copy.deepcopy(layer.mlp.gate)
        assert layer.mlp.gate.context is not model.routing_context
        with_cache = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
        assert layer.mlp.gate.context is model.routing_context
        without_cache = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without_cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_rows_equals_f_normalize_bit_for_bit(dtype: torch.dtype) -> None:
    """The router normalizes with ``unit_rows`` (fewer Python-level ops than ``F.normalize``); every routing
    decision depends on these values, so they must be ``F.normalize``'s to the bit, zero rows included."""
    from spectra_convert.modeling.modeling_spectra import unit_rows

    generator = torch.Generator().manual_seed(3)
    for shape in ((1, 32), (512, 32), (4, 7, 128)):
        x = (torch.randn(*shape, generator=generator) * 30).to(dtype)
        x.view(-1, shape[-1])[0] = 0
        assert torch.equal(unit_rows(x), torch.nn.functional.normalize(x, dim=-1))


# -- decoding step and the always-on part beside the recurrence ---------------------------------------------------


def build_carved_like(seed: int = 0, **knobs) -> SpectraForCausalLM:
    """A tiny model with a carve's block layout: ``sum`` combine, shared expert, skipped-experts estimate, random
    expert scales (one left at exactly 1: the step skips that multiply) and a non-zero estimate."""
    model = build("llama", seed=seed, expert_combine="sum", shared_expert=True, shared_intermediate_size=24,
                  skipped_estimate_rank=4, skipped_estimate_top_k=2, **knobs)
    with torch.no_grad():
        for layer in model.parent.model.layers:
            block = layer.mlp
            block.expert_scale.uniform_(0.5, 1.5)
            block.expert_scale[1] = 1.0
            for param in block.skipped_estimate.parameters():
                param.normal_(0, 0.2)
    return model


def decode_trace(model: SpectraForCausalLM, ids: torch.Tensor, prompt: int):
    """Every router output (logits, weights, selected), the logits and the router states of a cached decode."""
    routed: list[tuple[torch.Tensor, ...]] = []
    hooks = [r.register_forward_hook(lambda m, a, out: routed.append(out)) for r in model.routers()]
    try:
        with torch.no_grad():
            cache = SpectraCache(config=model.config.text_config)
            out = model(ids[:, :prompt], past_key_values=cache, use_cache=True)
            logits = [out.logits]
            for t in range(prompt, ids.shape[1]):
                out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
                logits.append(out.logits)
    finally:
        for hook in hooks:
            hook.remove()
    return routed, logits, cache.spectra_router_states


@pytest.mark.parametrize("sequence_balance", [0.0, 1.0])
@pytest.mark.parametrize("compiled", [False, True], ids=["torch", "compiled"])
def test_a_decoding_step_routes_like_the_general_path(sequence_balance: float, compiled: bool, monkeypatch) -> None:
    """``_route_step`` (a plain decoding step) must give the general ``_route``'s logits, weights, choices and
    router state -- to the bit through torch's ops; through the compiled step (``_route_step_loop``: float64
    sums) the same choices and sequence counts, logits, weights and GRU states within float rounding -- with the
    sequence term on and off and for several rows at once. (Hooks on the routers keep the whole-block kernel
    off: the router itself runs.)"""
    monkeypatch.setattr(modeling_spectra, "COMPILED_RECURRENCE", compiled)
    model = build_carved_like(sequence_balance=sequence_balance)
    ids = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(21))
    steps_taken = []
    fast_step = SpectraRouter._route_step
    monkeypatch.setattr(SpectraRouter, "_route_step", lambda self, *a: steps_taken.append(1) or fast_step(self, *a))
    fast = decode_trace(model, ids, prompt=5)
    assert len(steps_taken) == 2 * 9  # 2 layers x 9 decoding steps took the step path
    monkeypatch.setattr(SpectraRouter, "_is_plain_step", lambda self, steps: False)
    general = decode_trace(model, ids, prompt=5)
    assert len(steps_taken) == 2 * 9
    if not compiled:
        for one, other in zip(fast[0], general[0]):
            assert all(torch.equal(a, b) for a, b in zip(one, other))
        assert all(torch.equal(a, b) for a, b in zip(fast[1], general[1]))
        assert fast[2].keys() == general[2].keys() and all(torch.equal(fast[2][i], general[2][i]) for i in fast[2])
        return
    for (logits, weights, chosen), (logits_g, weights_g, chosen_g) in zip(fast[0], general[0]):
        assert torch.equal(chosen, chosen_g)
        torch.testing.assert_close(logits, logits_g, rtol=0, atol=1e-5)
        torch.testing.assert_close(weights, weights_g, rtol=0, atol=1e-5)
    for a, b in zip(fast[1], general[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert fast[2].keys() == general[2].keys()
    d = model.routers()[0].router_dim
    for i in fast[2]:
        torch.testing.assert_close(fast[2][i][:, :d], general[2][i][:, :d], rtol=0, atol=1e-6)
        assert torch.equal(fast[2][i][:, d:], general[2][i][:, d:])  # the sequence term's counts: exact


def spy_on_block_kernel(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch the compiled block step so that each call records numba's thread count at that moment."""
    import numba

    kernel = modeling_spectra.compiled_block_step()
    assert kernel is not None, "numba is a dependency of the package"
    calls: list[int] = []

    def spy(*args: object) -> None:
        calls.append(numba.get_num_threads())
        kernel(*args)

    monkeypatch.setattr(modeling_spectra, "_compiled_block", spy)
    return calls


@pytest.mark.parametrize("layout", ["carved", "copy"])
@pytest.mark.parametrize("sequence_balance", [0.0, 1.0])
def test_the_compiled_block_step_decodes_like_the_torch_path(layout: str, sequence_balance: float, monkeypatch) -> None:
    """A whole block's decoding step through ``_gated_block_step`` (routing, experts, shared expert and estimate
    in one call) must give the torch path's logits within float rounding, the same greedy tokens, and router
    states whose counts are exact -- for a carve's layout (sum combine, scales, shared expert, estimate) and a
    copy's (softmax weights, nothing always on), with the sequence term on and off."""
    model = (build_carved_like(sequence_balance=sequence_balance) if layout == "carved"
             else build("llama", sequence_balance=sequence_balance))
    ids = torch.randint(3, 128, (1, 14), generator=torch.Generator().manual_seed(23))
    calls = spy_on_block_kernel(monkeypatch)

    def run() -> tuple[list[torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
        with torch.no_grad():
            cache = SpectraCache(config=model.config.text_config)
            out = model(ids[:, :5], past_key_values=cache, use_cache=True)
            logits = [out.logits]
            for t in range(5, ids.shape[1]):
                out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
                logits.append(out.logits)
            generated = model.generate(ids[:, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
        return logits, cache.spectra_router_states, generated

    compiled = run()
    assert len(calls) == 2 * 9 + 2 * 7  # 2 layers x (9 teacher-forced + 7 generated) one-token steps
    monkeypatch.setattr(modeling_spectra, "COMPILED_RECURRENCE", False)
    reference = run()
    assert len(calls) == 2 * 16
    for a, b in zip(compiled[0], reference[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    d = model.routers()[0].router_dim
    for i in reference[1]:
        torch.testing.assert_close(compiled[1][i][:, :d], reference[1][i][:, :d], rtol=0, atol=1e-5)
        assert torch.equal(compiled[1][i][:, d:], reference[1][i][:, d:])
    assert torch.equal(compiled[2], reference[2])


def test_finetunes_lora_wrapping_prints_no_dependency_future_warning() -> None:
    """``finetune --mode lora`` wraps the model with PEFT, whose 0.21 release reads transformers 5's deprecated
    ``is_gradient_checkpointing`` alias: a FutureWarning on every run that is about two dependencies, not the
    user's command. The wrapping is silent."""
    import warnings

    from spectra_convert.finetune.modes import LoraMode, ModeOptions

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LoraMode().prepare(build("llama", seed=4), ModeOptions())
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


@pytest.mark.parametrize("setup", ["peft", "finetune"])
def test_the_compiled_block_step_applies_an_unmerged_expert_lora_like_the_merged_model(setup: str, monkeypatch) -> None:
    """Decoding with an unmerged PEFT LoRA on the fused expert tensors (and attention) runs the block kernel with
    the adapter's factors -- also with ``finetune --mode lora``'s setup, whose trained routers are PEFT
    ``modules_to_save`` copies: the logits of every cached step equal the merged model's and the torch path's
    within float rounding, and the adapter changes them."""
    from peft import LoraConfig, get_peft_model

    from spectra_convert.finetune.modes import LoraMode, ModeOptions, lora_candidates

    model = build("llama", seed=4)
    if setup == "peft":
        _, expert_params = lora_candidates(model)
        attention = ["q_proj", "k_proj", "v_proj", "o_proj"]  # finetune's default module targets (lm_head is tied here)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=attention,
                                                      target_parameters=expert_params)).eval()
    else:
        peft_model = LoraMode().prepare(model, ModeOptions()).eval()
        assert type(peft_model.base_model.model.model.layers[0].mlp.gate).__name__ == "ModulesToSaveWrapper"
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
            if "modules_to_save" in name and "dual_bias" not in name:
                param.add_(torch.randn_like(param) * 0.05)  # a trained router copy differs from the original
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    calls = spy_on_block_kernel(monkeypatch)

    def steps(net) -> torch.Tensor:
        with torch.no_grad():
            out = net(input_ids=ids[:, :4], use_cache=True)
            logits = []
            for t in range(4, ids.shape[1]):
                out = net(input_ids=ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
                logits.append(out.logits)
        return torch.cat(logits, 1)

    unmerged = steps(peft_model)
    assert len(calls) == 2 * 8  # every one-token step of both layers ran the kernel, adapter included
    with peft_model.disable_adapter():
        plain = steps(peft_model)
    assert len(calls) == 2 * 2 * 8  # adapters off (PEFT calls the base experts): the kernel without factors
    monkeypatch.setattr(modeling_spectra, "COMPILED_RECURRENCE", False)
    torch_path = steps(peft_model)
    monkeypatch.setattr(modeling_spectra, "COMPILED_RECURRENCE", True)
    with torch.no_grad():
        peft_model.merge_adapter()  # merged in place, wrappers kept: the kernel reads the merged base tensors
    merged_in_place = steps(peft_model)
    assert len(calls) == 3 * 2 * 8
    with torch.no_grad():
        peft_model.unmerge_adapter()
    merged = steps(peft_model.merge_and_unload())
    assert not torch.allclose(unmerged, plain, atol=1e-3), "the adapter must change the logits in this test"
    torch.testing.assert_close(unmerged, torch_path, atol=1e-4, rtol=0)
    torch.testing.assert_close(unmerged, merged, atol=1e-4, rtol=0)
    torch.testing.assert_close(merged_in_place, merged, atol=1e-4, rtol=0)


def test_the_compiled_block_steps_prepared_arguments_follow_every_change_to_the_block(monkeypatch) -> None:
    """A block prepares the kernel's arguments once and reuses them while nothing they were read from changed
    (``PreparedBlockStep``). Every change that would make them stale must reach the next step: parameters
    replaced (``load_state_dict(assign=True)``), storages moved (``double()`` and back), an in-place edit through
    ``.data`` and a new storage assigned to it, the expert vectors edited (their unit vectors are derived), ``top_k`` or the temperature changed,
    a part replaced, the model wrapped by PEFT. After each change the kernel's logits are the torch path's; in
    between, steps reuse."""
    model, other = build_carved_like(seed=3, repulsion=0.5), build_carved_like(seed=4, repulsion=0.5)
    token = torch.randint(3, 128, (1, 1), generator=torch.Generator().manual_seed(3))
    calls = spy_on_block_kernel(monkeypatch)
    prepared: list[int] = []
    prepare = modeling_spectra.PreparedBlockStep.of.__func__
    monkeypatch.setattr(modeling_spectra.PreparedBlockStep, "of",
                        classmethod(lambda cls, *args: prepared.append(1) or prepare(cls, *args)))

    def compiled_and_torch_path(net: torch.nn.Module = model) -> torch.Tensor:
        with torch.no_grad():
            compiled = net(input_ids=token).logits
            monkeypatch.setattr(modeling_spectra, "COMPILED_RECURRENCE", False)
            reference = net(input_ids=token).logits
            monkeypatch.setattr(modeling_spectra, "COMPILED_RECURRENCE", True)
        torch.testing.assert_close(compiled, reference, rtol=0, atol=1e-5)
        return compiled

    block = model.parent.model.layers[0].mlp
    changes = {
        "parameters replaced": lambda: model.load_state_dict(other.state_dict(), assign=True),
        "storages moved, then edited": lambda: (model.double().float(), block.experts.gate_up_proj.data.mul_(2.0)),
        "in place through .data": lambda: block.experts.down_proj.data.mul_(3.0),
        "new storage through .data": lambda: setattr(block.experts.gate_up_proj, "data", block.experts.gate_up_proj * 0.5),
        "expert vectors": lambda: block.gate.expert_vectors.data.copy_(torch.randn(block.gate.expert_vectors.shape)),
        "top_k": lambda: setattr(block.gate, "top_k", 3),
        "temperature": lambda: setattr(block.gate, "temperature", 1e3),  # selection by the dual bias alone
        "part replaced": lambda: setattr(block, "shared_expert", other.parent.model.layers[1].mlp.shared_expert),
    }
    before = compiled_and_torch_path()
    assert len(calls) == 2 and len(prepared) == 2
    compiled_and_torch_path()
    assert len(calls) == 4 and len(prepared) == 2, "an unchanged block reuses its prepared step"
    with torch.no_grad():
        for name, change in changes.items():
            change()
            after = compiled_and_torch_path()
            assert not torch.equal(after, before), f"{name}: this change must move the logits in this test"
            before = after
    assert len(calls) == 2 * (2 + len(changes))
    # wrapped by ``finetune --mode lora`` after plain steps: the prepared steps no longer fit (parts replaced by
    # wrappers), the logits are the torch path's
    from spectra_convert.finetune.modes import LoraMode, ModeOptions

    compiled_and_torch_path(LoraMode().prepare(model, ModeOptions()).eval())
    assert len(calls) == 2 * (2 + len(changes))  # a LoRA-wrapped shared expert: the torch path (the kernel steps aside)


def test_a_failing_block_kernel_warns_once_and_decoding_goes_on_with_torch_ops(monkeypatch) -> None:
    """If the compiled step cannot run here (say, a numba threading layer that cannot start), the step falls back
    to the torch path with one warning, the logits are the torch path's, and the kernel is not tried again."""
    model = build_carved_like()
    token = torch.randint(3, 128, (1, 1))
    monkeypatch.setattr(modeling_spectra, "COMPILED_RECURRENCE", False)
    with torch.no_grad():
        expected = model(token).logits
    monkeypatch.setattr(modeling_spectra, "COMPILED_RECURRENCE", True)
    modeling_spectra.compiled_block_step()  # compiled (or read from numba's cache) before it is replaced
    tries: list[int] = []

    def broken(*args: object) -> None:
        tries.append(1)
        raise ValueError("No threading layer could be loaded.")

    monkeypatch.setattr(modeling_spectra, "_compiled_block", broken)
    with pytest.warns(RuntimeWarning, match="compiled decoding step failed"):
        with torch.no_grad():
            first = model(token).logits
    with torch.no_grad():
        model(token)
    assert tries == [1] and modeling_spectra._compiled_block is None
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=0)


def test_the_compiled_block_step_keeps_the_callers_threads_and_steps_aside(monkeypatch) -> None:
    """The block kernel runs on as many threads as torch's kernels are given (numba keeps its own count), and it
    steps aside -- the torch path runs -- for anything it does not compute: a hook on a part, autograd, several
    tokens, several rows or another dtype."""
    model = build_carved_like()
    calls = spy_on_block_kernel(monkeypatch)
    token = torch.randint(3, 128, (1, 1))
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            for count in (1, 2):
                torch.set_num_threads(count)
                model(token)
                assert calls[-2:] == [count, count]
            calls.clear()
            hook = model.parent.model.layers[0].mlp.experts.act_fn.register_forward_hook(lambda *a: None)
            model(token)
            assert len(calls) == 1  # layer 0 ran the torch path, layer 1 the kernel
            hook.remove()
            model(torch.randint(3, 128, (1, 3)))
            model(torch.randint(3, 128, (2, 1)))
            model.double()(token)
            assert len(calls) == 1
        model.float()(token).logits.sum().backward()
        assert len(calls) == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(len(__import__("os").sched_getaffinity(0)) < 2, reason="numba's pool has one thread here")
def test_starting_numbas_thread_pool_keeps_the_processs_thread_count() -> None:
    """numba's OpenMP layer sets OpenMP's thread count to every core when its pool starts (the block kernel's
    compile or cache load), and torch reads its count from OpenMP: a process started with OMP_NUM_THREADS=1 must
    still run torch on one thread after its first decoding step, and the kernel with it (as must one that set
    ``torch.set_num_threads(1)``). A fresh process, since the pool starts once per process."""
    import os
    import subprocess
    import sys

    script = textwrap.dedent(
        """
        import numba, torch
        from spectra_convert.modeling import modeling_spectra
        from tests.test_runtime import build_carved_like  # (tests/conftest.py sets 2 threads: back to the env's)
        torch.set_num_threads(1)
        model = build_carved_like()
        with torch.no_grad():
            model(torch.randint(3, 128, (1, 1)))
        assert modeling_spectra.compiled_block_step() is not None
        print(torch.get_num_threads(), numba.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NUMBA_NUM_THREADS", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                            cwd=str(modeling_spectra.__file__).rsplit("/spectra_convert/", 1)[0])
    assert result.returncode == 0, result.stderr[-2000:]
    torch_threads, numba_threads, pool = map(int, result.stdout.split())
    assert pool >= 2  # the pool did start with every core, so the test can fail
    assert (torch_threads, numba_threads) == (1, 1)


def test_the_always_on_part_runs_beside_the_recurrence_with_the_same_values(monkeypatch) -> None:
    """Without autograd, a block's shared expert and estimate run on a helper thread while the router runs ATen's
    GRU loop (docs/ARCHITECTURE.md, "Runtime speed"); the output must be the serial one to the bit. Under
    autograd, or with the compiled loop (too short to hide anything), they stay on the caller's thread."""
    import threading

    monkeypatch.setattr(modeling_spectra, "COMPILED_RECURRENCE", False)
    model = build_carved_like()
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(22))  # 80 rows >= OVERLAP_MIN_TOKENS
    where: list[str] = []
    hooks = [layer.mlp.skipped_estimate.register_forward_hook(lambda *a: where.append(threading.current_thread().name))
             for layer in model.parent.model.layers]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            beside = model(ids).logits
        assert len(where) == 2 and all(name.startswith("spectra-beside") for name in where)
        with torch.inference_mode():
            assert torch.equal(model(ids).logits, beside)
        where.clear()
        monkeypatch.setattr(modeling_spectra, "overlaps_recurrence", lambda flat: False)
        with torch.no_grad():
            serial = model(ids).logits
        assert torch.equal(beside, serial) and where == ["MainThread"] * 2
        monkeypatch.undo()
        where.clear()
        model(ids).logits.sum().backward()  # autograd on: serial, and the estimate is trained like everything else
        assert where == ["MainThread"] * 2
        assert all(layer.mlp.skipped_estimate.in_weight.grad.abs().sum() > 0 for layer in model.parent.model.layers)
        where.clear()
        monkeypatch.setattr(modeling_spectra, "COMPILED_RECURRENCE", True)
        with torch.no_grad():
            model(ids)
        assert where == ["MainThread"] * 2
    finally:
        torch.set_num_threads(threads)
        for hook in hooks:
            hook.remove()


def test_a_lora_wrapped_shared_expert_runs_through_its_adapter() -> None:
    """``finetune --mode lora`` targets a carved block's shared expert too; PEFT then wraps it, and the block must
    call it through the wrapper (which applies the adapter), never past it: unmerged == merged, beside the
    recurrence (80 rows) and serially (3 rows)."""
    from peft import LoraConfig, get_peft_model

    model = build_carved_like()
    config = LoraConfig(r=4, lora_alpha=8, target_parameters=["mlp.shared_expert.gate_up_proj", "mlp.shared_expert.down_proj"])
    tuned = get_peft_model(model, config)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(23))
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
        unmerged = [tuned(ids).logits, tuned(ids[:, :3]).logits]
        with tuned.disable_adapter():
            plain = tuned(ids).logits
        merged = tuned.merge_and_unload()
        merged_logits = [merged(ids).logits, merged(ids[:, :3]).logits]
    assert (unmerged[0] - plain).abs().max() > 1e-2, "the adapter must matter for this test to mean anything"
    for got, want in zip(unmerged, merged_logits):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
