"""Fine-tuning demonstration on real weights: SmolLM2-135M-Instruct upcycled to 8 experts top-2, then router-only
and LoRA fine-tuning on the real-text fixture corpus (CPU), with held-out perplexity and load CV before/after.

    OMP_NUM_THREADS=2 .venv/bin/python bench/finetune_demo.py --work /tmp/ftdemo [--steps 40]

Both modes start from the same upcycled folder and are evaluated on the same held-out file
(tests/fixtures/corpus/heldout.jsonl, never trained on), so the numbers in the final table sit side by side.
Learning rates are higher than the CLI defaults so that a short CPU run moves the routers measurably.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.conftest locates the SmolLM2 GGUF
CORPUS = REPO / "tests" / "fixtures" / "corpus"


def dense_parent_perplexity(seq_len: int, max_records: int | None) -> float:
    """Perplexity of the dense SmolLM2 parent on the held-out blocks the fine-tune evaluates on (same packing,
    same token-weighted next-token NLL as ``finetune.trainer.evaluate``): the bar the MoE must not exceed."""
    import math

    import torch
    import torch.nn.functional as F

    from spectra_convert.finetune.data import pack, read_texts
    from spectra_convert.modelio.parent import load_dense_parent
    from tests.conftest import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    model, tokenizer = load_dense_parent(gguf.parent, gguf.name, torch.float32)
    heldout = CORPUS / "heldout.jsonl"
    blocks = pack(read_texts(heldout, max_records=max_records), tokenizer, seq_len, source=str(heldout))
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, blocks.shape[0], 4):
            ids = blocks[start:start + 4]
            logits = model(input_ids=ids, use_cache=False).logits.float()
            nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                         reduction="sum"))
            tokens += ids[:, 1:].numel()
    return math.exp(nll / tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/spectra-finetune-demo"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr-router", type=float, default=1e-3)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-eval-records", type=int, default=None)
    parser.add_argument("--modes", default="router,lora")
    args = parser.parse_args()

    import torch

    from spectra_convert.finetune import finetune
    from spectra_convert.surgery.upcycle import upcycle
    from tests.conftest import smollm2_gguf_path

    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.work.mkdir(parents=True, exist_ok=True)
    upcycled = args.work / "smollm2-8x-top2"
    timings: dict[str, float] = {}
    if not (upcycled / "config.json").is_file():
        gguf = smollm2_gguf_path()
        start = time.perf_counter()
        upcycle(str(gguf.parent), upcycled, experts=8, top_k=2, gguf_file=gguf.name, seed=0, force=True)
        timings["upcycle"] = time.perf_counter() - start

    dense_ppl = dense_parent_perplexity(args.seq_len, args.max_eval_records)
    rows = []
    for mode in args.modes.split(","):
        start = time.perf_counter()
        result = finetune(
            upcycled, CORPUS / "train.jsonl", args.work / f"finetuned-{mode}", mode=mode, steps=args.steps,
            seq_len=args.seq_len, batch_size=args.batch_size, lr_router=args.lr_router, lr=args.lr,
            eval_data=CORPUS / "heldout.jsonl", save_every=0, log_every=10, force=True, seed=0,
            log_file=args.work / f"finetune-{mode}.jsonl",
        )
        timings[mode] = time.perf_counter() - start
        b, a = result.eval_before, result.eval_after
        rows.append({
            "mode": mode, "dense_ppl": dense_ppl, "steps": result.steps, "ppl_before": b["perplexity"], "ppl_after": a["perplexity"],
            "mean_cv_before": b["mean_cv"], "mean_cv_after": a["mean_cv"],
            "max_cv_before": max(b["load_cv"]), "max_cv_after": max(a["load_cv"]),
            "loss_first": result.losses[0], "loss_last": result.losses[-1], "seconds": timings[mode],
        })

    print(f"\nSmolLM2-135M-Instruct upcycled 8x top-2; held-out = {CORPUS / 'heldout.jsonl'}; "
          f"seq-len {args.seq_len}, batch {args.batch_size}, {args.steps} steps, CPU")
    header = ("mode", "dense parent ppl", "ppl before", "ppl after", "mean CV before", "mean CV after", "max CV before",
              "max CV after", "train loss first", "train loss last", "seconds")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([r["mode"]] + [f"{r[k]:.4g}" for k in (
            "dense_ppl", "ppl_before", "ppl_after", "mean_cv_before", "mean_cv_after", "max_cv_before", "max_cv_after",
            "loss_first", "loss_last", "seconds")]))
    (args.work / "demo.json").write_text(json.dumps({"rows": rows, "timings": timings, "args": vars(args)},
                                                    indent=2, default=str))
    print(f"timings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")


if __name__ == "__main__":
    main()
