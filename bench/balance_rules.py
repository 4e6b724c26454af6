"""Per-sequence balance rules replayed offline on a copy model's captured router logits (issue 18, item 8).

Why: ``bench/balance.py`` showed that the runtime's first per-sequence correction, which tracked each sequence's
mean SOFT routing distribution (softmax of the logits), balanced unseen text best at beta = 1 and got WORSE at
beta = 2, 4, 8. This script asked whether another rule would do better before the runtime was changed (it
now runs ``hard``, ``SpectraRouter.sequence_select``): it captures every router's raw logits ``-C/tau`` (sequence correction off) on the
calibration corpus and on ``mixed_eval.jsonl`` once, then replays, for each rule and beta, what the runtime
does -- dual bias corrected on hard calibration loads with the rule in the loop (``calibrate_bias``'s
schedule), then selection on the eval documents -- and prints hard-load CV (mean / worst layer / per domain).

Rules: ``soft`` (the runtime until 2026-12-05: exclusive running mean of softmax(logits)); ``soft+bias`` (the same with the
dual bias inside the softmax); ``hard`` (the exclusive running share of each expert among the sequence's own
earlier top-k SELECTIONS, committed every ``--chunk`` tokens so that a prefill loops T / chunk times, not T).
With copied experts routing does not change a block's output (1% noise apart), so replaying the captured
logits is what the model would do; the ``soft`` row is checked against ``bench/balance.py``'s real run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/balance_rules.py --model /tmp/balance/copy --work /tmp/rules \
        [--layers 0,5,10,15,20,25,29] [--rules soft,soft+bias,hard] [--betas 0.5,1,2,4] [--chunk 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from carve import CORPUS, REPO, blocks_of  # noqa: E402


@torch.no_grad()
def capture_logits(model_dir: Path) -> dict:
    """Every router's raw logits ``[B, T, E]`` on 8192 calibration tokens and per eval document, with domains."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spectra_convert.textdata import load_texts

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    routers = model.routers()
    for router in routers:
        router.sequence_balance = 0.0
    captured: dict[int, list[torch.Tensor]] = {}
    hooks = [r.register_forward_hook(lambda m, a, o, i=i: captured.setdefault(i, []).append(o[0].float()))
             for i, r in enumerate(routers)]
    calibration = blocks_of(tokenizer, REPO / "spectra_convert" / "data" / "calibration.jsonl", 8192)
    for start in range(0, calibration.shape[0], 4):
        model(input_ids=calibration[start:start + 4], use_cache=False)
    calib = [torch.cat(captured[i]).view(calibration.shape[0], calibration.shape[1], -1) for i in range(len(routers))]
    captured.clear()
    domains = []
    for record in load_texts(CORPUS / "mixed_eval.jsonl"):
        model(input_ids=tokenizer(record.text, return_tensors="pt", truncation=True, max_length=256)["input_ids"],
              use_cache=False)
        domains.append(record.domain)
    evals = [[x.unsqueeze(0) for x in captured[i]] for i in range(len(routers))]
    return {"calib": calib, "evals": evals, "domains": domains, "k": routers[0].top_k,
            "sinkhorn_iters": routers[0].sinkhorn_iters}


def select(logits: torch.Tensor, bias: torch.Tensor, rule: str, beta: float, k: int, chunk: int) -> torch.Tensor:
    """Top-k choices ``[B, T, k]`` of one sequence batch under ``rule`` (see the module docstring)."""
    batch, steps, experts = logits.shape
    if rule == "hard":
        counts, parts = torch.zeros(batch, experts), []
        for start in range(0, steps, chunk):
            mean = counts / (start * k) if start > 0 else torch.full((batch, experts), 1.0 / experts)
            part = torch.topk(logits[:, start:start + chunk] + bias - beta * experts * (mean - 1.0 / experts).unsqueeze(1),
                              k, dim=-1).indices
            counts.scatter_add_(1, part.reshape(batch, -1), torch.ones(batch, part.shape[1] * k))
            parts.append(part)
        return torch.cat(parts, 1)
    probs = torch.softmax(logits + (bias if rule == "soft+bias" else 0.0), dim=-1)
    seen = (torch.cumsum(probs, 1) - probs)
    count = torch.arange(steps).view(1, -1, 1).float()
    mean = torch.where(count > 0, seen / count.clamp(min=1), torch.full_like(probs, 1.0 / experts))
    return torch.topk(logits - beta * experts * (mean - 1.0 / experts) + bias, k, dim=-1).indices


def load_cv(selected: torch.Tensor, experts: int) -> float:
    loads = torch.bincount(selected.reshape(-1), minlength=experts).float()
    return float(loads.std(unbiased=False) / loads.mean())


def calibrate(logits: torch.Tensor, rule: str, beta: float, k: int, chunk: int, iters: int, steps: int) -> torch.Tensor:
    """``calibrate_bias_on_scores``'s schedule (Sinkhorn start, decaying hard-load correction, best kept), with
    the rule's selection inside the loop (for ``hard`` and ``soft+bias`` the correction depends on the bias)."""
    from spectra_convert.modeling.modeling_spectra import sinkhorn

    flat = logits.reshape(-1, logits.shape[-1])
    sample = flat[torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(0))[:2048]]
    bias = sinkhorn(sample, k, iters)[1].clone().float()
    best, best_cv, scale = bias.clone(), float("inf"), float(logits.std())
    for step in range(steps):
        loads = torch.bincount(select(logits, bias, rule, beta, k, chunk).reshape(-1), minlength=flat.shape[1]).float()
        cv = float(loads.std(unbiased=False) / loads.mean())
        if cv < best_cv:
            best, best_cv = bias.clone(), cv
        if cv == 0.0:
            break
        bias += (0.5 * scale * (1.0 - step / steps) + 1e-3 * scale) * (loads.mean() - loads) / loads.mean()
        bias -= bias.mean()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a copy-upcycled SPECTRA folder (bench/balance.py)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/spectra-balance-rules"))
    parser.add_argument("--layers", default="0,5,10,15,20,25,29")
    parser.add_argument("--rules", default="soft,soft+bias,hard")
    parser.add_argument("--betas", default="0.5,1,2,4")
    parser.add_argument("--chunk", type=int, default=16)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "router_logits.pt"
    if not cache.exists():
        torch.save(capture_logits(args.model), cache)
    data = torch.load(cache, weights_only=True)
    k, iters, domains = data["k"], data["sinkhorn_iters"], data["domains"]
    layers = [int(x) for x in args.layers.split(",")]
    names = sorted(set(domains))
    print(f"{args.model}: layers {args.layers}, top-{k}, hard-rule chunk {args.chunk}; mixed_eval.jsonl, 256 tokens per document")
    print("| rule | beta | CV mean | CV worst | " + " | ".join(f"CV {d}" for d in names) + " |")
    print("|---" * (4 + len(names)) + "|")
    for rule in args.rules.split(","):
        for beta in (float(b) for b in args.betas.split(",")):
            cvs, per = [], {d: [] for d in names}
            for layer in layers:
                bias = calibrate(data["calib"][layer], rule, beta, k, args.chunk, iters, 60 if rule == "hard" else 400)
                chosen = [select(x, bias, rule, beta, k, args.chunk).reshape(-1, k) for x in data["evals"][layer]]
                experts = data["calib"][layer].shape[-1]
                cvs.append(load_cv(torch.cat(chosen), experts))
                for d in names:
                    per[d].append(load_cv(torch.cat([c for c, dom in zip(chosen, domains) if dom == d]), experts))
            print(f"| {rule} | {beta:g} | {sum(cvs) / len(cvs):.3f} | {max(cvs):.3f} | "
                  + " | ".join(f"{sum(v) / len(v):.3f}" for v in per.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
