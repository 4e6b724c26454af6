"""How well can any router predict a carved layer's experts from the FFN input? One run, SmolLM2-135M.

Why this exists (issue 18's "router within 5% of oracle routing"): the SPECTRA router of a carved block is,
before its GRU state and dual bias, a linear gate on the FFN input (``router/oracle_fit.py``). This bench asks
whether more capacity would close the gap to the oracle: for a few layers it carves the parent's FFN the way
``upcycle --method carve`` does (8 routed experts + a shared expert, ``plan_carve``; ``--shared-fraction``
defaults to 0.125, the converter's default until 2026-12-06, whose plan the README row measured), then fits
several predictors of the oracle's top-k on calibration text (code, docs, legal) and scores them on text from a
domain the calibration never saw (changelogs):

- ``ridge (mass ratio)``: ridge regression to ``mass / mean(mass)`` (``oracle_fit.standardised``, the converter's
  target);
- ``ridge (log ratio)``: ridge to the centred log mass (more recall, not better perplexity: ``standardised``);
- ``+ listwise``: the mass-ratio ridge gate, then Adam steps on a softmax cross-entropy against the oracle's top-k
  set, the step count chosen on a held-out eighth of the calibration tokens (what ``fit_spectra_router`` does);
- ``+ shared acts``: the mass-ratio ridge on the FFN input and the shared expert's activations (free at run time:
  the shared expert runs for every token);
- ``sentinels m``: the mass-ratio ridge on the FFN input and ``|activation|`` of ``m`` neurons per routed expert,
  those whose output size follows their expert's mass most closely on calibration (a router that computes
  ``8 m`` of the parent's gate/up rows for every token: ``8 m / I`` of the FFN's gate/up work);
- ``mlp H``: the listwise gate plus a tanh MLP with H hidden units trained the same way (a nonlinear router).

Per layer and k it prints held-out oracle recall and the output left out: ``||sum of unselected experts'
outputs||^2`` over ``||dense FFN output||^2``, means over tokens (the oracle's own value first: what top-k of
this carve leaves out at best). Recall and output left out are proxies: perplexity is what counts, and a target
that raised recall did not lower it (``oracle_fit.standardised``); ``bench/carve.py`` measures perplexity.

    OMP_NUM_THREADS=2 .venv/bin/python bench/router_capacity.py [--layers 2,10,18,26] [--top-k 4,6]
        [--shared-fraction 0.125] [--calibration-tokens 16384] [--eval-tokens 4096] [--mlp-hidden 32,128]
        [--mlp-steps 1000] [--sentinels 4,16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from carve import CORPUS, blocks_of  # noqa: E402  (bench/carve.py: the same text as the carving bench)
from runtime import GGUF, smollm2_dir  # noqa: E402

from spectra_convert.router.oracle_fit import oracle_topk, ridge_fit, standardised, topk_recall  # noqa: E402
from spectra_convert.router.tap import capture_inputs  # noqa: E402
from spectra_convert.surgery.carve import contributions, expert_outputs, intermediate_activations, plan_carve  # noqa: E402


@torch.no_grad()
def ffn_inputs(model, blocks: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """Each listed layer's FFN input ``[N, H]`` on ``blocks`` (the parent's, captured as the converter captures
    them: ``router.tap.capture_inputs``, each forward stopped at the last listed layer's FFN)."""
    forwards = (lambda chunk=blocks[start:start + 4]: model.model(input_ids=chunk, use_cache=False)
                for start in range(0, blocks.shape[0], 4))
    captured = capture_inputs([model.model.layers[i].mlp for i in layers], forwards)
    return {i: x.reshape(-1, x.shape[-1]) for i, x in zip(layers, captured)}


def listwise(score, params: list[torch.Tensor], x: torch.Tensor, sets: torch.Tensor, held_x: torch.Tensor,
             held_oracle: torch.Tensor, k: int, steps: int, lr: float = 3e-3) -> None:
    """Adam steps on ``params`` against the oracle's top-k sets; keeps the parameters (the start included) with
    the best held-out recall, checked every 25 steps."""
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(0)
    best, kept = -1.0, None
    for step in range(steps + 1):
        if step % 25 == 0:
            with torch.no_grad():
                recall = topk_recall(score(held_x).topk(k, -1).indices, held_oracle)
            if recall > best:
                best, kept = recall, [p.detach().clone() for p in params]
        if step == steps:
            break
        rows = torch.randperm(x.shape[0], generator=generator)[:4096]
        loss = -(sets[rows] * torch.log_softmax(score(x[rows]), -1)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for p, saved in zip(params, kept):
            p.copy_(saved)


def left_out(selected: torch.Tensor, outputs: torch.Tensor, dense: torch.Tensor) -> float:
    """``mean ||sum of the unselected experts' outputs||^2 / mean ||dense output||^2``."""
    keep = torch.zeros(outputs.shape[:2]).scatter_(1, selected, 1.0)
    missing = (outputs * (1 - keep).unsqueeze(-1)).sum(1)
    return float(missing.pow(2).sum(-1).mean() / dense.pow(2).sum(-1).mean())


def sentinels(acts: torch.Tensor, down: torch.Tensor, plan, mass: torch.Tensor, m: int) -> torch.Tensor:
    """Per routed expert the ``m`` neurons whose output size ``|act_i| * ||down_i||`` follows the expert's mass
    most closely on calibration tokens (Pearson correlation): the cheapest nonlinear witnesses of a slice, since
    their activations are terms of the very sum the oracle ranks by."""
    size = contributions(acts, down)
    chosen = []
    for e, neurons in enumerate(plan.groups):
        z = size[:, neurons]
        z = z - z.mean(0)
        t = mass[:, e] - mass[:, e].mean()
        corr = (z * t[:, None]).sum(0) / (z.norm(dim=0) * t.norm() + 1e-12)
        chosen.append(neurons[corr.topk(min(m, neurons.numel())).indices])
    return torch.cat(chosen)


def layer_report(model, layer: int, x_cal: torch.Tensor, x_eval: torch.Tensor, ks: list[int], hidden_sizes: list[int],
                 mlp_steps: int, shared_fraction: float, sentinel_counts: list[int]) -> None:
    mlp = model.model.layers[layer].mlp
    dense = {"gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(), "down": mlp.down_proj.weight.detach()}
    acts_cal = intermediate_activations(dense, x_cal, F.silu)
    acts_eval = intermediate_activations(dense, x_eval, F.silu)
    plan = plan_carve(contributions(acts_cal, dense["down"]), 8, shared_fraction, seed=layer)
    mass_cal = expert_outputs(acts_cal, dense["down"], plan).norm(dim=-1)
    outputs_eval = expert_outputs(acts_eval, dense["down"], plan)
    mass_eval, dense_eval = outputs_eval.norm(dim=-1), acts_eval @ dense["down"].float().T
    shared_cal, shared_eval = acts_cal[:, plan.shared], acts_eval[:, plan.shared]
    fit = torch.arange(x_cal.shape[0]) < int(x_cal.shape[0] * 0.875)
    for k in ks:
        oracle_eval, oracle_cal = oracle_topk(mass_eval, k), oracle_topk(mass_cal, k)
        sets = torch.zeros(mass_cal.shape).scatter_(1, oracle_cal, 1.0 / k)
        rows = {"oracle": (1.0, left_out(oracle_eval, outputs_eval, dense_eval))}

        def report(name: str, scores: torch.Tensor) -> None:
            selected = scores.topk(k, -1).indices
            rows[name] = (topk_recall(selected, oracle_eval), left_out(selected, outputs_eval, dense_eval))

        log_mass = mass_cal.clamp(min=1e-12).log()
        w_log, b_log = ridge_fit(x_cal, log_mass - log_mass.mean(-1, keepdim=True), 1e-1)
        weight, bias = ridge_fit(x_cal, standardised(mass_cal), 1e-1)
        report("ridge (mass ratio)", x_eval @ weight.T + bias)
        report("ridge (log ratio)", x_eval @ w_log.T + b_log)
        both_cal, both_eval = torch.cat([x_cal, shared_cal], 1), torch.cat([x_eval, shared_eval], 1)
        w_shared, b_shared = ridge_fit(both_cal, standardised(mass_cal), 1e-1)
        report("+ shared acts", both_eval @ w_shared.T + b_shared)
        for m in sentinel_counts:
            chosen = sentinels(acts_cal, dense["down"], plan, mass_cal, m)
            sent_cal, sent_eval = torch.cat([x_cal, acts_cal[:, chosen].abs()], 1), torch.cat([x_eval, acts_eval[:, chosen].abs()], 1)
            w_sent, b_sent = ridge_fit(sent_cal, standardised(mass_cal), 1e-1)
            report(f"sentinels {m}", sent_eval @ w_sent.T + b_sent)
        gate = torch.nn.Linear(x_cal.shape[1], 8)
        with torch.no_grad():
            gate.weight.copy_(weight)
            gate.bias.copy_(bias)
        listwise(gate, list(gate.parameters()), x_cal[fit], sets[fit], x_cal[~fit], oracle_cal[~fit], k, 400)
        with torch.no_grad():
            report("+ listwise", gate(x_eval))
        for hidden in hidden_sizes:
            torch.manual_seed(0)
            net = torch.nn.Sequential(torch.nn.Linear(x_cal.shape[1], hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 8))
            linear = torch.nn.Linear(x_cal.shape[1], 8)
            with torch.no_grad():
                linear.weight.copy_(gate.weight)
                linear.bias.copy_(gate.bias)
            score = lambda x, net=net, linear=linear: net(x) + linear(x)  # noqa: E731
            listwise(score, list(net.parameters()) + list(linear.parameters()), x_cal[fit], sets[fit], x_cal[~fit],
                     oracle_cal[~fit], k, mlp_steps)
            with torch.no_grad():
                report(f"mlp {hidden}", score(x_eval))
        print(f"| {layer} | {k} | " + " | ".join(f"{r:.3f} / {o:.4f}" for r, o in rows.values()) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2,10,18,26")
    parser.add_argument("--top-k", default="4,6")
    parser.add_argument("--shared-fraction", type=float, default=0.125)
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--mlp-hidden", default="32,128")
    parser.add_argument("--mlp-steps", type=int, default=1000)
    parser.add_argument("--sentinels", default="4,16", help="neurons per expert whose |activation| join the ridge's inputs")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    layers = [int(v) for v in args.layers.split(",")]
    calibration = blocks_of(tokenizer, REPO / "spectra_convert" / "data" / "calibration.jsonl", args.calibration_tokens)
    unseen = blocks_of(tokenizer, CORPUS / "unseen.jsonl", args.eval_tokens)
    x_cal, x_eval = ffn_inputs(model, calibration, layers), ffn_inputs(model, unseen, layers)
    hidden_sizes = [int(v) for v in args.mlp_hidden.split(",") if v]
    sentinel_counts = [int(v) for v in args.sentinels.split(",") if v]
    names = (["oracle", "ridge (mass ratio)", "ridge (log ratio)", "+ shared acts"] + [f"sentinels {m}" for m in sentinel_counts]
             + ["+ listwise"] + [f"mlp {h}" for h in hidden_sizes])
    print("held-out oracle recall / output left out, unseen changelog text")
    print("| layer | k | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for layer in layers:
        layer_report(model, layer, x_cal[layer], x_eval[layer], [int(v) for v in args.top_k.split(",")], hidden_sizes,
                     args.mlp_steps, args.shared_fraction, sentinel_counts)


if __name__ == "__main__":
    main()
