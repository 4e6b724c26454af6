"""Ablation switches of the runtime config (issue 8 item 1): each is a documented ``spectra`` field, the defaults
are unchanged, and each switch changes routing.

Tiny random-weight llama-parent SpectraForCausalLM models (structure only, not quality). Two models built with
the same seed differ only in the switched knob: for knobs that are not parameters (repulsion, temperature,
Sinkhorn iterations, balance mode) their weights are identical, so any change in the selected experts is the
knob's doing; for shape knobs (GRU, projector, router dim) the test also checks the mechanism itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spectra_convert.modeling.configuration_spectra import SPECTRA_DEFAULTS, SpectraConfig
from spectra_convert.modeling.modeling_spectra import SpectraForCausalLM, SpectraRouter
from tests.conftest import tiny_parent_config

SWITCHES = {  # knob -> (paper default, ablated value)
    "use_gru": (True, False),
    "use_projector": (True, False),
    "repulsion": (0.5, 0.0),
    "ortho_loss_coef": (0.01, 0.0),
    "balance_mode": ("dual_bias", "in_batch"),
    "temperature": (0.1, 0.5),
    "sinkhorn_iters": (20, 1),
    "router_dim": (128, 8),
    "router_entropy_coef": (0.1, 0.0),
}


def build(seed: int = 0, similar_experts: bool = False, **knobs) -> SpectraForCausalLM:
    """``similar_experts``: expert vectors share a common direction (as k-means prototypes of copy-upcycled
    experts do), so their Gram matrix has sizeable off-diagonal entries for the repulsion to act on."""
    torch.manual_seed(seed)
    spectra = {"num_experts": 4, "top_k": 2, "router_dim": 16, "sequence_balance": 0.0, **knobs}
    model = SpectraForCausalLM(SpectraConfig(text_config=tiny_parent_config("llama").to_dict(), spectra=spectra))
    with torch.no_grad():
        for router in model.routers():
            router.dual_bias.copy_(torch.linspace(-0.3, 0.3, router.num_experts))
            if similar_experts:
                mu = router.expert_vectors
                mu.copy_(F.normalize(mu[:1] + 0.6 * mu, dim=-1))
    return model.eval()


def inputs(batch: int = 3, steps: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, steps), generator=torch.Generator().manual_seed(seed))


def selected(model: SpectraForCausalLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each router's selected expert sets (sorted) for ``ids``."""
    out: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda m, a, o: out.append(o[2].sort(-1).values)) for r in model.routers()]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return out


def changed_share(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(torch.cat([(x != y).any(-1).float() for x, y in zip(a, b)]).mean())


def test_defaults_unchanged_and_documented() -> None:
    source = (Path(__file__).parents[1] / "spectra_convert/modeling/configuration_spectra.py").read_text()
    for knob, (default, _) in SWITCHES.items():
        assert SPECTRA_DEFAULTS[knob] == default, knob
        # every switch is a documented field: a comment on its SPECTRA_DEFAULTS line
        assert re.search(rf'"{knob}": [^\n]*#\s*\S', source), f"{knob} has no comment in SPECTRA_DEFAULTS"


@pytest.mark.parametrize("knob", ["repulsion", "temperature", "balance_mode"])
def test_non_parameter_switch_changes_routing_with_identical_weights(knob: str) -> None:
    default, ablated = SWITCHES[knob]
    a, b = build(similar_experts=True, **{knob: default}), build(similar_experts=True, **{knob: ablated})
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name  # same weights: only the knob differs
    ids = inputs()
    assert changed_share(selected(a, ids), selected(b, ids)) > 0.02


def test_sinkhorn_iterations_change_in_batch_routing() -> None:
    a = build(balance_mode="in_batch", sinkhorn_iters=20)
    b = build(balance_mode="in_batch", sinkhorn_iters=1)
    ids = inputs()
    assert changed_share(selected(a, ids), selected(b, ids)) > 0.0


def test_in_batch_depends_on_batch_mates_dual_bias_does_not() -> None:
    ids = inputs(batch=4)
    for mode, invariant in (("dual_bias", True), ("in_batch", False)):
        model = build(balance_mode=mode)
        together = selected(model, ids)
        alone = selected(model, ids[:1])
        rows = ids.shape[1]
        same = all(torch.equal(t[:rows], s) for t, s in zip(together, alone))
        assert same is invariant, mode


def test_no_repulsion_cost_is_minus_scores() -> None:
    router = build(repulsion=0.0).routers()[0]
    scores = torch.randn(5, 4)
    assert torch.equal(router.osr_cost(scores), -scores)
    repelled = build().routers()[0].osr_cost(scores)
    assert not torch.allclose(repelled, -scores)


def test_no_gru_router_is_stateless() -> None:
    """With the GRU, a token's routing depends on earlier tokens; without it, only on the token itself."""
    h = torch.randn(1, 12, 32)
    h_other_prefix = h.clone()
    h_other_prefix[:, :6] = torch.randn(1, 6, 32)
    for use_gru, depends in ((True, True), (False, False)):
        router = build(use_gru=use_gru).routers()[0]
        with torch.no_grad():
            logits_a = router(h)[0][6:]
            logits_b = router(h_other_prefix)[0][6:]
        assert (not torch.allclose(logits_a, logits_b)) is depends, use_gru
        assert hasattr(router, "gru") is use_gru
    ids = inputs()
    assert changed_share(selected(build(), ids), selected(build(use_gru=False), ids)) > 0.02


def test_no_projector_scores_raw_state_against_expert_vectors() -> None:
    router = build(use_projector=False).routers()[0]
    assert not hasattr(router, "projector")
    assert router.expert_vectors.shape == (4, 32 + 16)  # [h; r] space, no projection
    h = torch.randn(1, 7, 32)
    with torch.no_grad():
        r = router.sequential_state(h, None, None)[0]
        expected = F.normalize(torch.cat([h, r], -1), dim=-1).reshape(7, -1) @ router.unit_expert_vectors().T
        logits = router(h)[0]
    torch.testing.assert_close(logits, -router.osr_cost(expected) / router.temperature)
    assert router.orthogonality_loss().item() == 0.0
    ids = inputs()
    assert changed_share(selected(build(), ids), selected(build(use_projector=False), ids)) > 0.02


def test_router_dim_sets_state_and_expression_size() -> None:
    small, large = build(router_dim=8).routers()[0], build(router_dim=16).routers()[0]
    assert small.gru.hidden_size == 8 and small.projector.shape == (8, 32 + 8)
    assert large.gru.hidden_size == 16 and large.expert_vectors.shape == (4, 16)
    ids = inputs()
    assert changed_share(selected(build(router_dim=8), ids), selected(build(router_dim=16), ids)) > 0.02


def _train_routers(model: SpectraForCausalLM, steps: int = 8) -> SpectraForCausalLM:
    """A few SGD steps on the routers only (LM loss + the model's router aux loss), deterministic."""
    torch.manual_seed(0)
    with torch.no_grad():  # a projector off the orthogonal manifold, so the orthogonality loss has a gradient
        for router in model.routers():
            router.projector.add_(0.3 * torch.randn_like(router.projector))
    params = [p for r in model.routers() for p in r.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=0.05)
    ids = inputs(batch=2, steps=32, seed=3)
    model.train()
    for _ in range(steps):
        out = model(input_ids=ids, labels=ids, use_cache=False, output_router_logits=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("knob,on,off", [("ortho_loss_coef", 1.0, 0.0), ("router_entropy_coef", 1.0, 0.0)])
def test_training_loss_switch_changes_routing_after_training(knob: str, on: float, off: float) -> None:
    with_loss, without = _train_routers(build(**{knob: on})), _train_routers(build(**{knob: off}))
    ids = inputs()
    assert changed_share(selected(with_loss, ids), selected(without, ids)) > 0.0
    if knob == "ortho_loss_coef":  # and it does what it says: the projector ends closer to orthogonal
        def ortho(m: SpectraForCausalLM) -> float:
            return float(sum(r.orthogonality_loss().detach() for r in m.routers()))
        assert ortho(with_loss) < ortho(without)


def test_unknown_switch_is_rejected_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"spectra\.use_grus: unknown field; allowed fields: .*use_gru"):
        SpectraConfig(text_config=tiny_parent_config("llama").to_dict(), spectra={"use_grus": False})
    with pytest.raises(ValueError, match="balance_mode"):
        SpectraConfig(text_config=tiny_parent_config("llama").to_dict(), spectra={"balance_mode": "batch"})
    assert isinstance(build().routers()[0], SpectraRouter)
