"""Latent Prototype Routing (seed 004) as a baseline: the router's properties, its validate row and perplexity
when it drives the experts, and the study's trained ``lpr`` variant.

Router-property tests use random hidden states (the router is a function of a vector; no text is involved);
the validate and study tests use tiny random-weight models with a real BPE tokenizer and the fixture corpus
(orchestration and bookkeeping, not quality; the measured SmolLM2 comparison is in the README).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from spectra_convert.errors import UserError
from spectra_convert.validate.lpr import DISTRIBUTION_METRICS, METRICS, LatentPrototypeRouter, LPRSettings, fit_lpr

H, E, K = 48, 6, 2


def _hidden(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(E, H, generator=generator)
    return centres[torch.arange(n) % E] + torch.randn(n, H, generator=generator)


# -- the router ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "kl"])
def test_selection_is_per_token_and_batch_invariant(metric: str) -> None:
    router = fit_lpr(_hidden(600), E, K, settings=LPRSettings(metric=metric), steps=20)
    x = _hidden(64, seed=1)
    _, weights_alone, alone = router(x[:5])
    _, weights_batched, batched = router(torch.cat([x[:5], 10 * _hidden(200, seed=2)]))
    one_by_one = torch.cat([router(x[i:i + 1])[2] for i in range(5)])
    assert torch.equal(alone, batched[:5]) and torch.equal(alone, one_by_one)
    torch.testing.assert_close(weights_alone, weights_batched[:5])
    assert torch.allclose(weights_alone.sum(-1), torch.ones(5))
    # the variational encoder samples in training only: inference is deterministic
    assert torch.equal(router(x)[2], router(x)[2])
    router.train()
    assert not torch.equal(router(x)[0], router(x)[0])


def test_prototypes_start_and_stay_on_the_unit_sphere() -> None:
    router = LatentPrototypeRouter(H, E, K, seed=3)
    norms = router.prototypes.detach().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(E))
    assert not torch.allclose(router.prototypes, LatentPrototypeRouter(H, E, K, seed=4).prototypes)
    fitted = fit_lpr(_hidden(600), E, K, steps=15)
    torch.testing.assert_close(fitted.prototypes.norm(dim=-1), torch.ones(E))


def test_ema_moves_each_prototype_towards_the_latents_assigned_to_it() -> None:
    router = LatentPrototypeRouter(H, E, K, LPRSettings(ema_decay=0.9), seed=0)
    router.keep_last = True
    router(_hidden(300))
    out = router.last
    before = router.prototypes.detach().clone()
    router.ema_update(out)
    after = router.prototypes.detach()
    latents = F.normalize(out.z.detach(), dim=-1)
    for e in range(E):
        assigned = (out.selected == e).any(-1)
        if not assigned.any():
            torch.testing.assert_close(after[e], before[e])
            continue
        mean = latents[assigned].mean(0)
        torch.testing.assert_close(after[e], F.normalize(0.9 * before[e] + 0.1 * mean, dim=0))
        assert F.cosine_similarity(after[e], mean, dim=0) > F.cosine_similarity(before[e], mean, dim=0)
    # decay 0 turns EMA off
    frozen = LatentPrototypeRouter(H, E, K, LPRSettings(ema_decay=0.0), seed=0)
    frozen.keep_last = True
    frozen(_hidden(300))
    start = frozen.prototypes.detach().clone()
    frozen.ema_update(frozen.last)
    assert torch.equal(frozen.prototypes.detach(), start)


@pytest.mark.parametrize("metric", METRICS)
def test_losses_are_finite_and_train_what_they_should(metric: str) -> None:
    router = LatentPrototypeRouter(H, E, K, LPRSettings(metric=metric), seed=0).train()
    router.keep_last = True
    logits, weights, selected = router(_hidden(128))
    losses = router.regularisers(router.last)
    assert all(math.isfinite(float(v)) for v in losses.values())
    assert float(losses["kl"]) >= 0 and float(losses["div"]) >= 0 and float(losses["align"]) >= 0
    losses["total"].backward(retain_graph=True)
    assert router.encoder.weight.grad.abs().sum() > 0  # diversity + KL shape the encoder
    assert router.prototypes.grad.abs().sum() > 0  # alignment moves the prototypes
    if metric in DISTRIBUTION_METRICS:
        assert router.log_var.weight.grad.abs().sum() > 0
    # the stop-gradient: alignment alone never reaches the encoder
    router.zero_grad(set_to_none=True)
    router.regularisers(router.last)["align"].backward()
    assert router.encoder.weight.grad is None or float(router.encoder.weight.grad.abs().sum()) == 0.0
    assert router.prototypes.grad.abs().sum() > 0


def test_variational_kl_is_zero_at_the_prior_and_positive_elsewhere() -> None:
    router = LatentPrototypeRouter(H, E, K, seed=0).train()
    router.keep_last = True
    router(_hidden(64))
    assert float(router.regularisers(router.last)["kl"]) > 0
    with torch.no_grad():
        router.encoder.weight.zero_(), router.encoder.bias.zero_(), router.log_var.bias.zero_()
    router(_hidden(64))
    assert float(router.regularisers(router.last)["kl"]) == pytest.approx(0.0, abs=1e-7)
    plain = LatentPrototypeRouter(H, E, K, LPRSettings(variational=False, kl_weight=0.01), seed=0).train()
    plain.keep_last = True
    plain(_hidden(64))
    assert float(plain.regularisers(plain.last)["kl"]) == 0.0


def test_fitting_clusters_and_balances_better_than_its_random_start() -> None:
    from spectra_convert.router import metrics as M

    data = _hidden(1200)
    fitted = fit_lpr(data, E, K, steps=60)
    start = LatentPrototypeRouter(H, E, K, seed=0).eval()
    held = _hidden(600, seed=5)
    loads = [np.bincount(r(held)[2].reshape(-1).numpy(), minlength=E) for r in (start, fitted)]
    assert M.load_cv(loads[1]) < M.load_cv(loads[0])
    with pytest.raises(ValueError, match="needs variational=True"):
        LPRSettings(metric="kl", variational=False)


# -- validate: the lpr row and baseline perplexity ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random SPECTRA model (random, distinct experts: routing changes perplexity) and its collection."""
    from spectra_convert.textdata import load_texts
    from spectra_convert.validate.collect import collect_routing, load_spectra_model, pad_id_of, tokenize_texts
    from tests.test_validate import HELDOUT, _spectra_folder, _train_tokenizer

    tok = tmp_path_factory.mktemp("tok")
    vocab = _train_tokenizer(tok)
    folder = _spectra_folder(tmp_path_factory.mktemp("spectra") / "tiny", tok, vocab)
    model, tokenizer = load_spectra_model(folder)
    with torch.no_grad():  # random experts at init std 0.02 barely touch the residual: make them matter
        for name, param in model.named_parameters():
            if ".experts." in name:
                param.mul_(40)
    texts = tokenize_texts(tokenizer, load_texts(HELDOUT), max_length=96, max_tokens=1200)
    collection = collect_routing(model, texts, pad_id_of(tokenizer), batch_tokens=512, capture_inputs=True)
    return folder, model, texts, pad_id_of(tokenizer), collection


def test_driven_baselines_route_like_their_offline_rows(tiny) -> None:
    """In layer 0 (whose input no routing choice has touched yet) a baseline driving the experts picks what its
    offline row measured; SPECTRA's own pass through the same code gives validate's perplexity."""
    from spectra_convert.router import metrics as M
    from spectra_convert.validate.baselines import linear_gate, lpr, split_fit_eval, switch
    from spectra_convert.router.find import find_routers
    from spectra_convert.validate.driven import DriveState, baseline_gates, driven_pass, eval_half_texts

    _, model, texts, pad_id, collection = tiny
    gates = [linear_gate(r) for r in find_routers(model)]
    _, evaluate = split_fit_eval(collection.seq_ids, collection.domains)
    fit = np.setdiff1d(np.arange(collection.num_tokens), evaluate)
    fitted = [{"lpr": lpr(layer.inputs, 4, 2, fit, evaluate),
               "switch-top1": switch(layer.inputs.float() @ gate.T, 1, gate)}
              for layer, gate in zip(collection.layers, gates)]
    half = eval_half_texts(collection.seq_ids, evaluate)
    seqs = [texts.ids[i] for i in half]
    own = driven_pass(model, texts.ids, pad_id, None, batch_tokens=512)
    assert own.perplexity() == pytest.approx(M.perplexity(collection.nll_sum, collection.nll_count), rel=1e-5)
    max_id = int(collection.token_ids.max())
    ppl = {}
    for name, tokens in (("lpr", evaluate), ("switch-top1", np.arange(collection.num_tokens))):
        gates = baseline_gates(name, fitted, num_experts=4, top_k=2, max_token_id=max_id, seed=0, state=DriveState())
        run = driven_pass(model, seqs if name == "lpr" else texts.ids, pad_id, gates, batch_tokens=512, capture=True)
        offline = fitted[0][name]
        assert len(run.selected[0]) == len(tokens) == len(offline.token_index)
        agree = float((run.selected[0][:, 0] == offline.top1).mean())
        assert agree > 0.99, (name, agree)
        ppl[name] = run.perplexity()
    assert all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert ppl["switch-top1"] != pytest.approx(own.perplexity(), rel=1e-4)  # distinct experts: routing matters


# -- study: the trained lpr variant ---------------------------------------------------------------------------------


def test_study_lpr_variant_plan_errors(tmp_path: Path) -> None:
    from spectra_convert.study import load_plan, parse_plan

    base = {"name": "t", "convert": {"experts": 4, "top_k": 2}, "validate": {"nmi": False}}
    plan = parse_plan({**base, "variants": [{"name": "full"}, {"name": "lpr", "router": "lpr",
                                                                 "lpr": {"metric": "wasserstein"}}]}, tmp_path / "p.yaml")
    full, lpr = plan.variants
    assert lpr.router == "lpr" and lpr.lpr == {"metric": "wasserstein"}
    assert lpr.conversion_key() == full.conversion_key()  # the same experts
    shipped = load_plan(Path(__file__).parents[1] / "recipes" / "study-smollm2-lpr-cpu.yaml")
    assert [(v.name, v.router) for v in shipped.variants] == [("full", "spectra"), ("lpr", "lpr")]
    assert len({v.conversion_key() for v in shipped.variants}) == 1
    for variant, match in (({"router": "lpx"}, "router must be one of spectra, lpr"),
                           ({"router": "lpr", "spectra": {"repulsion": 0.0}}, "without SPECTRA knobs"),
                           ({"lpr": {"metric": "cosine"}}, "need router: lpr"),
                           ({"router": "lpr", "lpr": {"metrik": "kl"}}, "unknown key 'metrik'"),
                           ({"router": "lpr", "lpr": {"metric": "kl", "variational": False}}, "variational=True")):
        with pytest.raises(UserError, match=match):
            parse_plan({**base, "variants": [{"name": "v", **variant}]}, tmp_path / "p.yaml")


def test_study_trains_and_measures_an_lpr_variant(tmp_path: Path) -> None:
    """A one-variant plan: the lpr variant upcycles the conversion itself, fits, fine-tunes and measures."""
    from spectra_convert.study import read_results, run_study
    from tests.study_helpers import FIXTURES, build_dense_llama

    dense = build_dense_llama(tmp_path / "dense")
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "name": "tiny-lpr", "seed": 0,
        "convert": {"experts": 4, "top_k": 2, "router_dim": 16, "calibration_tokens": 512},
        "finetune": {"steps": 3, "seq_len": 64, "batch_size": 2, "lr_router": 0.001},
        "validate": {"max_tokens": 512, "nmi": True},
        "variants": [{"name": "lpr", "router": "lpr"}],
    }))
    result = run_study(str(dense), FIXTURES / "train.jsonl", FIXTURES / "mixed_eval.jsonl", plan, tmp_path / "out")
    (row,) = read_results(result.out)
    assert row["router"] == "lpr" and row["tokens"] == 512 and row["batch_invariance_agree"] is True
    m = row["metrics"]
    assert m["perplexity"] > 1 and math.isfinite(m["cv"]) and 0 <= m["domain_nmi"] <= 1
    assert 0 <= m["routing_consistency"] <= 1 and 0 <= m["seq_consistency"] <= 1
    ft = row["finetune"]
    assert ft["steps"] == 3 and math.isfinite(ft["final_loss"]) and ft["ppl_before"] > 1 and ft["ppl_after"] > 1
    summary = (result.out / "summary.md").read_text()
    assert "| lpr |" in summary and "LPR router: metric=cosine" in summary
