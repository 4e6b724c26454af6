"""Balance on unseen domains against the per-sequence correction's strength ``sequence_balance`` (beta), one run.

Issue 18, item 8: the balance goal for ``copy`` upcycles (hard-load CV mean < 0.05 and worst layer < 0.10 on
text from domains the calibration never saw) is missed at the default beta = 1. With copied experts the choice
of expert does not change the output, so balance is the only thing routing decides and beta can be as strong as
balance needs; for carved experts (``--carved DIR``) it trades against oracle recall, which is printed too.

For each beta: every router's ``sequence_balance`` is set, its dual bias re-corrected on the calibration
corpus with that beta (``recalibrate_model_bias``, what ``finetune`` ends with), then measured on
``tests/fixtures/corpus/mixed_eval.jsonl`` (changelog = unseen, code / docs / legal = held-out documents of the
calibration domains; each document truncated to 256 tokens): load CV mean over layers, worst layer, per domain,
domain NMI of the top-1 choice; and perplexity (and, for carved models, oracle recall) on 4096 tokens of
``unseen.jsonl``.

    OMP_NUM_THREADS=2 .venv/bin/python bench/balance.py --work /tmp/balance [--model DIR] [--betas 0,1,2,4,8]

Without ``--model``, SmolLM2-135M is upcycled ``--experts 8 --top-k 2`` (copy, defaults) into WORK/copy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from carve import CORPUS, REPO, balance_study, blocks_of, perplexity, routed_eval  # noqa: E402


def measure(model, tokenizer, calibration: torch.Tensor, unseen: torch.Tensor, beta: float, carved: bool) -> dict:
    """One beta: set it on every router, re-correct the dual biases with it, measure balance and perplexity."""
    from spectra_convert.router.recalibrate import recalibrate_model_bias

    for router in model.routers():
        router.sequence_balance = beta
    calibration_cv = recalibrate_model_bias(model, calibration)
    row = {"beta": beta, "calibration_cv_mean": sum(calibration_cv) / len(calibration_cv),
           **balance_study(model, tokenizer, "cpu")}
    if carved:
        row["ppl"], row["recall"] = routed_eval(model, unseen, "cpu")
    else:
        row["ppl"] = perplexity(model, unseen, "cpu")
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/spectra-balance-bench"))
    parser.add_argument("--model", type=Path, default=None, help="a SPECTRA folder (default: a fresh copy upcycle)")
    parser.add_argument("--betas", default="0,1,2,4,8")
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import smollm2_gguf_path

    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model
    if model_dir is None:
        from spectra_convert.surgery.upcycle import upcycle

        gguf = smollm2_gguf_path()
        model_dir = args.work / "copy"
        if not (model_dir / "config.json").exists():
            upcycle(str(gguf.parent), model_dir, experts=8, top_k=2, method="copy", gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    carved = model.config.spectra.get("expert_combine") == "sum"
    calibration = blocks_of(tokenizer, REPO / "spectra_convert" / "data" / "calibration.jsonl", args.calibration_tokens)
    unseen = blocks_of(tokenizer, CORPUS / "unseen.jsonl", args.eval_tokens)
    with torch.no_grad():
        rows = [measure(model, tokenizer, calibration, unseen, float(b), carved) for b in args.betas.split(",")]
    (args.work / "balance.json").write_text(json.dumps({"model": str(model_dir), "rows": rows}, indent=2))
    domains = list(rows[0]["cv_per_domain"])
    print(f"\n{model_dir} ({'carved' if carved else model.config.spectra.get('source', '')}, "
          f"top-{model.config.spectra['top_k']} of {model.config.spectra['num_experts']}), bias re-corrected per beta "
          f"on {calibration.numel()} calibration tokens; mixed_eval.jsonl, 256 tokens per document")
    print("| beta | CV mean | CV worst | " + " | ".join(f"CV {d}" for d in domains) + " | domain NMI | ppl unseen"
          + (" | recall |" if carved else " |"))
    print("|---" * (5 + len(domains) + carved) + "|")
    for r in rows:
        print(f"| {r['beta']:g} | {r['cv_mean']:.3f} | {r['cv_worst']:.3f} | "
              + " | ".join(f"{r['cv_per_domain'][d]:.3f}" for d in domains)
              + f" | {r['domain_nmi']:.3f} | {r['ppl']:.2f}" + (f" | {r['recall']:.3f} |" if carved else " |"))


if __name__ == "__main__":
    main()
