"""The router floor: finding routers, ``RouterTap`` and the runtime methods bias calibration uses.

Tiny random-weight llama-parent SpectraForCausalLM models (structure only, not quality).
"""

from __future__ import annotations

import torch

from spectra_convert.modeling.configuration_spectra import SpectraConfig
from spectra_convert.modeling.modeling_spectra import SpectraForCausalLM
from spectra_convert.router.calibrate import calibrate_bias
from spectra_convert.router.recalibrate import recalibrate_model_bias
from spectra_convert.router.find import find_routers
from spectra_convert.router.tap import RouterTap, capture_inputs
from tests.conftest import tiny_parent_config


def _model(layers: int = 3) -> SpectraForCausalLM:
    torch.manual_seed(0)
    config = SpectraConfig(text_config=tiny_parent_config("llama", num_hidden_layers=layers).to_dict(),
                           spectra={"num_experts": 4, "top_k": 2, "router_dim": 16})
    return SpectraForCausalLM(config).eval()


def _ids(batch: int = 3, steps: int = 20) -> torch.Tensor:
    return torch.randint(0, 128, (batch, steps), generator=torch.Generator().manual_seed(1))


def test_find_routers_in_layer_order() -> None:
    model = _model()
    assert [r.layer_idx for r in find_routers(model)] == [0, 1, 2]
    assert find_routers(model) == model.routers()


@torch.no_grad()
def test_selection_scores_are_what_forward_ranks_before_the_bias() -> None:
    """select(selection_scores) is exactly the forward's choice (eval, no padding), and computing the
    scores moves nothing, in training mode either."""
    model = _model()
    ids = _ids()
    with RouterTap(find_routers(model), inputs=True) as tap:
        model(input_ids=ids, use_cache=False)
        records = tap.take()
    for router, record in zip(find_routers(model), records):
        router.dual_bias.copy_(torch.linspace(-0.2, 0.2, router.num_experts))
        assert record["inputs"].shape == (*ids.shape, 32)
        scores = router.selection_scores(record["inputs"])
        chosen = router.select(scores.view(*ids.shape, -1)).reshape(-1, router.top_k)
        _, _, forward_choice = router(record["inputs"])
        assert torch.equal(chosen, forward_choice)
        router.train()
        bias = router.dual_bias.clone()
        router.selection_scores(record["inputs"])
        assert torch.equal(router.dual_bias, bias) and router.balance_mode == "dual_bias"


@torch.no_grad()
def test_tap_stops_after_the_last_input_and_masks_real_tokens() -> None:
    model = _model()
    routers = find_routers(model)
    ids = _ids()
    ran = []
    hook = routers[-1].register_forward_hook(lambda *args: ran.append(True))
    try:
        inputs = capture_inputs(routers, [lambda: model(input_ids=ids, use_cache=False)])
    finally:
        hook.remove()
    assert not ran  # the forward stopped before the last router ran
    assert [tuple(x.shape) for x in inputs] == [(3, 20, 32)] * 3
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0
    with RouterTap(routers, inputs=True) as tap:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        records = tap.take(mask)
    real = int(mask.sum())
    assert [tuple(r["selected"].shape) for r in records] == [(real, 2)] * 3
    # right padding changes nothing before it (causal): layer 0's real-token inputs are the unpadded run's
    assert torch.allclose(records[0]["inputs"], inputs[0].reshape(-1, 32)[mask.reshape(-1).bool()], atol=1e-5)


def test_calibration_balances_and_recalibration_leaves_modes_alone() -> None:
    model = _model()
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    inputs = capture_inputs(find_routers(model), [lambda: model(input_ids=ids, use_cache=False)])
    router = find_routers(model)[0]
    cv = calibrate_bias(router, inputs[0])
    loads = torch.bincount(router.select(router.selection_scores(inputs[0]).view(*inputs[0].shape[:2], -1)).reshape(-1),
                           minlength=4).float()
    assert abs(cv - float(loads.std(unbiased=False) / loads.mean())) < 1e-6 and cv < 0.1
    model.train()
    cvs = recalibrate_model_bias(model, ids)
    assert len(cvs) == 3 and model.training and all(r.balance_mode == "dual_bias" for r in find_routers(model))
