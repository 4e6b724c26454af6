"""Carving benchmark, one run: SmolLM2-135M carved into a shared expert + 8 routed slices (``upcycle --method
carve``), held-out perplexity ratio to the parent at several active-FFN fractions for four ways of picking the
slices -- the oracle (upper bound), the SPECTRA router fitted by the converter, a ridge-fitted linear gate on the
same data (as fitted, and with a hard-load balancing bias from the loop that balances the SPECTRA router, so the
two are also compared at equal balance), random -- then after a short ``finetune --mode lora`` (+ routers), the
balance study (per-sequence correction on / off / dual bias alone), and whole-model time per token against the
parent, interleaved.

    OMP_NUM_THREADS=2 .venv/bin/python bench/carve.py --work /tmp/carve-bench [--device cuda]
        [--calibration-tokens 32768] [--eval-tokens 4096] [--top-k 1,2,5] [--finetune-steps 40]
        [--recalibration-tokens 8192]

LoRA curve (``--lora-minutes M``, replaces the rest of the bench): ONE ``finetune --mode lora`` (+ routers) run of
the carved model (``--carved DIR`` of an earlier run, else carved here at ``--finetune-k``) on the calibration
corpus for about M minutes of training, evaluated at step 0 and ``--lora-evals`` points along the way. The run is
cut into segments: each segment is a ``finetune(..., steps=S_i, checkpoint_dir=WORK/lora-checkpoints,
resume=True, merge=True)`` call, and a kept checkpoint folder holds the final step, so the next call with a
larger S continues the same run (same data order, optimizer and RNG state: identical to one run of S steps;
the learning rates are a function of the step alone; a decaying ``--lora-schedule`` spans ``--lora-decay-steps``
fixed up front, and the curve stops there). Each segment's output is what a run stopped at S_i writes: LoRA merged, dual
biases re-corrected on ``--recalibration-tokens`` training tokens (default 8192, not the library's 65536, which
takes over 20 minutes on 2 busy cores; the corrected biases never flow back into training). The first segment is
``--lora-first-steps`` long; the later targets are spread evenly over the time left at the measured speed.
Training minutes are the trainer's own step timings (its log file), without loading, evaluation, bias
correction and saving, which each segment's wall time includes. Prints a markdown table (steps | minutes |
tokens seen | ppl ratio | recall) and writes WORK/lora_curve.json after every point:

    OMP_NUM_THREADS=2 .venv/bin/python bench/carve.py --work /tmp/lora-curve --carved /tmp/carve/carved \
        --lora-minutes 30 --lora-evals 6

Held-out text is from domains the calibration never saw: ``tests/fixtures/corpus/unseen.jsonl`` (changelogs) for
perplexity and recall, ``mixed_eval.jsonl`` (4 domains) for per-domain balance and domain NMI. The calibration
corpus is ``spectra_convert/data/calibration.jsonl`` (code, docs, legal; ``--calibration FILE`` for more text of
the same domains, e.g. ``scripts/build_corpus.py --training-out FILE``). Carving (the neuron plan) does not
depend on k; for each k the routers are refitted to that k's oracle with the converter's own functions (under the
folder's per-sequence term, ``sequence_balance``), and the skipped-experts estimate (when the folder has one) is
refitted to what each way of picking drops (``fit_estimates``); the table's "no estimate" column is the SPECTRA
router with the estimate zeroed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.conftest locates the SmolLM2 GGUF
CORPUS = REPO / "tests" / "fixtures" / "corpus"
CALIBRATION = REPO / "spectra_convert" / "data" / "calibration.jsonl"


class FixedSelection(nn.Module):
    """Stands in for a block's router: selects with ``choose(hidden [N, H]) -> [N, k]`` (weights unused: the
    carved block multiplies by its expert scales)."""

    def __init__(self, choose, experts: int):
        super().__init__()
        self.choose, self.experts = choose, experts

    def forward(self, hidden: torch.Tensor):
        flat = hidden.reshape(-1, hidden.shape[-1])
        selected = self.choose(flat)
        return flat.new_zeros(flat.shape[0], self.experts), flat.new_ones(selected.shape), selected


def blocks_of(tokenizer, path: Path, tokens: int, seq_len: int = 256) -> torch.Tensor:
    from spectra_convert.router.calibrate import calibration_batches
    from spectra_convert.textdata import load_texts

    return calibration_batches(tokenizer, [r.text for r in load_texts(path)], max_tokens=tokens, seq_len=seq_len)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, device: str, batch: int = 4) -> float:
    nll, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch):
        ids = blocks[start:start + batch].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                       ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def routed_eval(model, blocks: torch.Tensor, device: str) -> tuple[float, float]:
    """(perplexity, mean oracle recall) of the model as currently routed."""
    from spectra_convert.router.oracle_fit import OracleTap

    with OracleTap(model) as tap:
        nll, count = 0.0, 0
        for start in range(0, blocks.shape[0], 4):
            ids = blocks[start:start + 4].to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            tap.take()
            nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                           ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
    recall = tap.recall()
    return math.exp(nll / count), sum(recall) / len(recall)


@torch.no_grad()
def capture_block_inputs(model, blocks: torch.Tensor, device: str) -> list[torch.Tensor]:
    """Every carved block's input ``[B, T, H]`` on ``blocks`` (run with all experts on: the parent's FFN inputs)."""
    from spectra_convert.router.oracle_fit import carved_blocks

    layers = carved_blocks(model)
    parts: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: parts[i].append(a[0].float().cpu())) for i, b in enumerate(layers)]
    saved = [b.gate.top_k for b in layers]
    for b in layers:
        b.gate.top_k = b.gate.num_experts
    try:
        for start in range(0, blocks.shape[0], 4):
            model(input_ids=blocks[start:start + 4].to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        for b, k in zip(layers, saved):
            b.gate.top_k = k
    return [torch.cat(p) for p in parts]


def fit_routers(model, inputs: list[torch.Tensor], k: int, steps: int | None, sequence_balance: float, device: str,
                ridge: float | None = None):
    """Refit every SPECTRA router for top-``k`` (the converter's functions; ``steps`` and ``ridge``: its listwise
    steps and ridge strength, ``None`` for the converter's defaults) and a ridge linear gate per layer."""
    from spectra_convert.router.oracle_fit import (ROUTER_RIDGE, ROUTER_STEPS, LinearGate, block_oracle_mass,
                                                   calibrate_carved_bias, carved_blocks, fit_spectra_router)

    gates = []
    for index, (block, x) in enumerate(zip(carved_blocks(model), inputs)):
        router = block.gate
        router.top_k, router.sequence_balance = k, sequence_balance
        router.cpu().float()
        mass = block_oracle_mass(block.experts.cpu().float(), x.reshape(-1, x.shape[-1]))
        router.reset_parameters()
        fit_spectra_router(router, x, mass, steps=ROUTER_STEPS if steps is None else steps, seed=index,
                           ridge=ROUTER_RIDGE if ridge is None else ridge)
        calibrate_carved_bias(router, x, mass, rule=router.carve_bias)  # the rule the folder was carved with
        gates.append(LinearGate(x, mass))
        block.to(device)
    return gates


@torch.no_grad()
def fit_estimates(model, inputs: list[torch.Tensor], k: int, how: str, gates, seed: int = 0) -> None:
    """Refit every block's skipped-experts estimate (the converter's ``fit_skipped_estimate``) to what ``how``'s
    selections (spectra | oracle | linear | random) drop on the calibration inputs at top-``k``: each way of
    picking slices is measured with the estimate it would be carved with. No-op for a folder carved without one."""
    from spectra_convert.router.oracle_fit import block_oracle_mass, carved_blocks, oracle_topk, router_selection
    from spectra_convert.surgery.carve import fit_skipped_estimate

    generator = torch.Generator().manual_seed(seed)
    for block, gate, x in zip(carved_blocks(model), gates, inputs):
        estimate = getattr(block, "skipped_estimate", None)
        if estimate is None:
            continue
        flat = x.reshape(-1, x.shape[-1])
        experts = block.experts.num_experts
        if how == "spectra":
            selected = router_selection(block.gate, x.to(block.gate.expert_vectors.device)).cpu()
        elif how == "oracle":
            selected = oracle_topk(block_oracle_mass(block.experts, flat), k)
        elif how == "linear":
            selected = gate.select(flat, k)
        else:
            selected = torch.rand(flat.shape[0], experts, generator=generator).topk(k, -1).indices
        tensors, _ = fit_skipped_estimate(flat, skipped_of(block, flat, selected), estimate.in_weight.shape[0])
        for name, tensor in tensors.items():
            getattr(estimate, name).data.copy_(tensor)
        estimate.fitted_top_k = k


@torch.no_grad()
def skipped_of(block, flat: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """``[N, H]``: what ``selected`` drops of the block's routed experts at their scales (``carve.skipped_output``),
    one expert at a time: every expert's output at once is E x N x H floats, 2.4 GB at 131072 SmolLM2 tokens."""
    scale = block.expert_scale.detach().cpu().float()
    kept = torch.zeros(flat.shape[0], block.experts.num_experts).scatter_(1, selected, 1.0) * scale
    skipped = torch.zeros(flat.shape[0], flat.shape[-1])
    for e in range(block.experts.num_experts):
        skipped.addcmul_(block.experts.expert(e, flat).float(), (1.0 - kept[:, e:e + 1]))
    return skipped


def estimates_off(model):
    """Zero every skipped-experts estimate (the column without it); returns the saved tensors for ``estimates_on``."""
    from spectra_convert.router.oracle_fit import carved_blocks

    saved = []
    for block in carved_blocks(model):
        estimate = getattr(block, "skipped_estimate", None)
        saved.append(None if estimate is None else {n: p.detach().clone() for n, p in estimate.named_parameters()})
        if estimate is not None:
            estimate.reset_parameters()
    return saved


def estimates_on(model, saved) -> None:
    from spectra_convert.router.oracle_fit import carved_blocks

    for block, tensors in zip(carved_blocks(model), saved):
        if tensors is not None:
            for name, tensor in tensors.items():
                getattr(block.skipped_estimate, name).data.copy_(tensor)


def with_routing(model, how: str, k: int, gates, seed: int = 0):
    """Swap every block's router for ``how`` (oracle | linear | random); returns the saved routers."""
    from spectra_convert.router.oracle_fit import block_oracle_mass, carved_blocks, oracle_topk

    generator = torch.Generator().manual_seed(seed)
    saved = []
    for block, gate in zip(carved_blocks(model), gates):
        experts = block.gate.num_experts
        saved.append(block.gate)
        if how == "oracle":
            choose = lambda h, b=block: oracle_topk(block_oracle_mass(b.experts, h), k)  # noqa: E731
        elif how == "linear":
            choose = lambda h, g=gate: g.select(h.cpu(), k).to(h.device)  # noqa: E731
        else:
            choose = lambda h, e=experts: torch.rand(h.shape[0], e, generator=generator).topk(k, -1).indices.to(h.device)  # noqa: E731
        block.gate = FixedSelection(choose, experts)
    return saved


def restore(model, saved) -> None:
    from spectra_convert.router.oracle_fit import carved_blocks

    for block, router in zip(carved_blocks(model), saved):
        block.gate = router


@torch.no_grad()
def balance_study(model, tokenizer, device: str) -> dict:
    """Load CV (overall, per domain) and domain NMI of the model's routers on mixed_eval.jsonl."""
    from spectra_convert.textdata import load_texts
    from spectra_convert.router import metrics as M

    records = load_texts(CORPUS / "mixed_eval.jsonl")
    per_layer: dict[int, list] = {}
    domains: list[str] = []
    routers = model.routers()
    hooks = [r.register_forward_hook(lambda m, a, o, i=i: per_layer.setdefault(i, []).append(o[2].cpu()))
             for i, r in enumerate(routers)]
    try:
        for record in records:
            ids = tokenizer(record.text, return_tensors="pt", truncation=True, max_length=256)["input_ids"].to(device)
            model(input_ids=ids, use_cache=False)
            domains += [record.domain] * ids.shape[1]
    finally:
        for hook in hooks:
            hook.remove()
    import numpy as np

    domains_arr = np.asarray(domains, dtype=object)
    cv, nmi, per_domain = [], [], {d: [] for d in sorted(set(domains))}
    for i in range(len(routers)):
        selected = torch.cat(per_layer[i]).numpy()
        cv.append(M.load_cv(M.expert_loads(selected, routers[i].num_experts)))
        nmi.append(M.domain_nmi(selected[:, 0], domains_arr))
        for d in per_domain:
            per_domain[d].append(M.load_cv(M.expert_loads(selected[domains_arr == d], routers[i].num_experts)))
    return {"cv_mean": float(np.mean(cv)), "cv_worst": float(np.max(cv)), "domain_nmi": float(np.mean(nmi)),
            "cv_per_domain": {d: float(np.mean(v)) for d, v in per_domain.items()}}


BIAS_MODES = ("seq+bias", "seq", "bias", "recall", "none")


def set_bias_mode(model, mode: str, inputs: list[torch.Tensor]) -> None:
    """Item-8 variants: ``seq+bias`` (sequence correction on, full balancing bias recalibrated with it), ``seq``
    (sequence correction alone), ``bias`` (full balancing dual bias alone, ``carve_bias="balance"``: the
    converter's default until 2026-12-06, thirteenth session; since then carves also write the sequence term at
    beta 0.5, ``CARVE_SEQUENCE_BALANCE``, which no variant here measures: the seq modes run at 1), ``recall`` (``carve_bias="recall"``: no sequence correction, balancing bias at the
    strength held-out recall allows; the default until 2026-12-05), ``none`` (fitted scores alone)."""
    from spectra_convert.router.calibrate import calibrate_bias
    from spectra_convert.router.oracle_fit import block_oracle_mass, calibrate_carved_bias, carved_blocks

    for block, x in zip(carved_blocks(model), inputs):
        router = block.gate
        router.sequence_balance = 1.0 if mode.startswith("seq") else 0.0
        device = router.dual_bias.device
        router.cpu()
        if mode in ("none", "seq"):
            router.dual_bias.zero_()
        elif mode in ("recall", "bias"):  # the converter's own rules (carve_bias "recall" / "balance")
            experts = block.experts.cpu()
            calibrate_carved_bias(router, x, block_oracle_mass(experts, x.reshape(-1, x.shape[-1])),
                                  rule="recall" if mode == "recall" else "balance")
            experts.to(device)
        else:  # seq+bias: the balancing bias recalibrated with the sequence term on
            calibrate_bias(router, x)
        router.to(device)


def bias_mode_study(model, tokenizer, inputs: list[torch.Tensor], unseen: torch.Tensor, parent_ppl: float,
                    device: str, modes: tuple[str, ...] = BIAS_MODES) -> dict[str, dict]:
    """Item 8: the ``BIAS_MODES`` variants of the model's routers, measured on unseen text (perplexity ratio,
    oracle recall) and on the 4-domain mix (load CV overall / worst layer / per domain, domain NMI). The biases
    are recalibrated on ``inputs`` (the calibration text's block inputs), and the skipped-experts estimate (if any)
    refitted to each variant's selections, as a carve with that rule would write it; the routers' fitted
    parameters are not touched."""
    study = {}
    for mode in modes:
        set_bias_mode(model, mode, inputs)
        fit_estimates(model, inputs, model.config.spectra["top_k"], "spectra", [None] * len(inputs))
        ppl, recall = routed_eval(model, unseen, device)
        study[mode] = {"ppl_ratio": ppl / parent_ppl, "recall": recall, **balance_study(model, tokenizer, device)}
        print(mode, json.dumps(study[mode]), flush=True)
    return study


def print_bias_modes(study: dict[str, dict]) -> None:
    print("| variant | ppl ratio | recall | CV mean | CV worst | CV per domain | domain NMI |")
    print("|---|---|---|---|---|---|---|")
    for mode, s in study.items():
        per = ", ".join(f"{d} {v:.3f}" for d, v in s["cv_per_domain"].items())
        print(f"| {mode} | {s['ppl_ratio']:.3f}x | {s['recall']:.3f} | {s['cv_mean']:.3f} | {s['cv_worst']:.3f} | "
              f"{per} | {s['domain_nmi']:.3f} |")


def balance_only(gguf: Path, args: argparse.Namespace) -> None:
    """``--balance-only --carved DIR``: the item-8 study on a carve as the converter wrote it (its routers and k)."""
    from transformers import AutoModelForCausalLM

    from spectra_convert.surgery.upcycle import load_dense_parent

    parent, tokenizer = load_dense_parent(gguf.parent, gguf.name, torch.float32)
    unseen = blocks_of(tokenizer, CORPUS / "unseen.jsonl", args.eval_tokens)
    parent_ppl = perplexity(parent.to(args.device), unseen, args.device)
    del parent
    model = AutoModelForCausalLM.from_pretrained(args.carved, trust_remote_code=True).eval().to(args.device)
    calibration = blocks_of(tokenizer, args.calibration, args.calibration_tokens)
    inputs = capture_block_inputs(model, calibration, args.device)
    modes = tuple(m for m in args.bias_modes.split(",") if m)
    if unknown := sorted(set(modes) - set(BIAS_MODES)):
        sys.exit(f"--bias-modes: unknown {', '.join(unknown)}; choose from {', '.join(BIAS_MODES)}")
    study = bias_mode_study(model, tokenizer, inputs, unseen, parent_ppl, args.device, modes)
    report = {"parent_ppl": parent_ppl, "carved": str(args.carved), "k": model.config.spectra["top_k"], "balance": study}
    (args.work / "balance_study.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nbias variants, carved {args.carved} (k={report['k']}), parent perplexity {parent_ppl:.3f}")
    print_bias_modes(study)


class TokenClock:
    """A ``generate`` streamer that only notes when each put arrives: the prompt (before the prefill), then every
    new token. The gaps after the first new token are the decoding steps alone."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def time_per_token(model, ids: torch.Tensor, decode: int, device: str) -> tuple[float, float, float]:
    """(seconds per token of one forward over ``ids``; seconds per generated token of greedy decoding from a
    32-token prompt, the prompt's prefill included; seconds per decoding step after the first new token)."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        sync()
        forward = (time.perf_counter() - start) / ids.shape[1]
        prompt = ids[:, :32]
        clock = TokenClock()
        start = time.perf_counter()
        model.generate(input_ids=prompt, max_new_tokens=decode, min_new_tokens=decode, do_sample=False,
                       streamer=clock if not device.startswith("cuda") else None)
        sync()
        total = time.perf_counter() - start
    steps = (clock.times[-1] - clock.times[1]) / (len(clock.times) - 2) if len(clock.times) > 2 else float("nan")
    return forward, total / decode, steps


def batch_forward_seconds(model, ids: torch.Tensor, device: str) -> float:
    """Seconds per token of one forward over a ``[B, T]`` batch (no cache)."""
    with torch.inference_mode():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / ids.numel()


def timing(parent, carved_dir: Path, unseen: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Whole-model time per token, carved (its converter's top-k) vs the parent, interleaved, medians: a 512-token
    forward at batch 1 and 4, and greedy decoding. Batch 4 shows what the GRU recurrence costs at batch 1: its
    ~512 sequential steps per layer are the same for 1 or 4 rows (docs/ARCHITECTURE.md, "Runtime speed")."""
    from transformers import AutoModelForCausalLM

    timed = AutoModelForCausalLM.from_pretrained(carved_dir, trust_remote_code=True).eval().to(args.device)
    ids = unseen[:1, :256].repeat(1, 2).to(args.device)  # 512 tokens
    batch = unseen[:4, :256].repeat(1, 2).to(args.device)  # 4 x 512 tokens
    for model in (parent, timed):  # warm-up, not timed
        time_per_token(model, ids[:, :64], 2, args.device)
    samples: dict[str, list] = {"parent": [], "carved": []}
    for _ in range(args.timing_repeats):  # interleaved: both see the same machine state
        for name, model in (("parent", parent), ("carved", timed)):
            samples[name].append((*time_per_token(model, ids, args.decode_tokens, args.device),
                                  batch_forward_seconds(model, batch, args.device)))
    med = {n: [statistics.median(s[i] for s in v) for i in range(4)] for n, v in samples.items()}
    return {"k": timed.config.spectra["top_k"], "threads": torch.get_num_threads(),
            "parent_forward_s_per_token": med["parent"][0], "carved_forward_s_per_token": med["carved"][0],
            "parent_decode_s_per_token": med["parent"][1], "carved_decode_s_per_token": med["carved"][1],
            "parent_step_s_per_token": med["parent"][2], "carved_step_s_per_token": med["carved"][2],
            "parent_forward_b4_s_per_token": med["parent"][3], "carved_forward_b4_s_per_token": med["carved"][3],
            "forward_ratio": med["carved"][0] / med["parent"][0], "decode_ratio": med["carved"][1] / med["parent"][1],
            "step_ratio": med["carved"][2] / med["parent"][2], "forward_b4_ratio": med["carved"][3] / med["parent"][3]}


def print_timing(t: dict[str, float], device: str) -> None:
    print(f"time per token (k={t['k']}, {device}, {t['threads']} threads): forward {t['carved_forward_s_per_token'] * 1e3:.2f} "
          f"vs {t['parent_forward_s_per_token'] * 1e3:.2f} ms = {t['forward_ratio']:.2f}x of the parent, batch-4 forward "
          f"{t['carved_forward_b4_s_per_token'] * 1e3:.2f} vs {t['parent_forward_b4_s_per_token'] * 1e3:.2f} ms = "
          f"{t['forward_b4_ratio']:.2f}x, greedy decode {t['carved_decode_s_per_token'] * 1e3:.1f} vs "
          f"{t['parent_decode_s_per_token'] * 1e3:.1f} ms = {t['decode_ratio']:.2f}x (32-token prompt's prefill "
          f"included), per decoding step {t['carved_step_s_per_token'] * 1e3:.1f} vs "
          f"{t['parent_step_s_per_token'] * 1e3:.1f} ms = {t['step_ratio']:.2f}x")


def carve_parent(gguf: Path, carved_dir: Path, args: argparse.Namespace):
    """SmolLM2 carved into 8 routed experts + shared at the bench's settings (``upcycle --method carve``)."""
    from spectra_convert.surgery.upcycle import upcycle

    return upcycle(str(gguf.parent), carved_dir, experts=8, top_k=args.finetune_k, method="carve", gguf_file=gguf.name,
                   calibration=str(args.calibration), calibration_tokens=args.calibration_tokens,
                   router_steps=args.router_steps,
                   shared_fraction=args.shared_fraction, carve_refit=args.carve_refit, force=True)


def given_or_carved(gguf: Path, args: argparse.Namespace) -> Path:
    """``--carved DIR`` when given, else a fresh carve into WORK/carved (the --timing-only and LoRA-curve runs)."""
    if args.carved is not None:
        return args.carved
    carve_parent(gguf, args.work / "carved", args)
    return args.work / "carved"


LORA = dict(mode="lora", seq_len=256, batch_size=4, lr=None, lr_router=1e-3, merge=True)  # every LoRA run here (lr None: finetune's default)


def training_seconds(log_file: Path, tokens_per_step: int) -> float:
    """Seconds spent in training steps, from the trainer's JSONL log: each record covers the steps since the
    previous one at its ``tokens_per_s`` (a segment's last step is always logged, so windows never span two)."""
    seconds, previous = 0.0, 0
    for line in log_file.read_text().splitlines():
        record = json.loads(line)
        seconds += (record["step"] - previous) * tokens_per_step / record["tokens_per_s"]
        previous = record["step"]
    return seconds


def lora_curve(carved_dir: Path, unseen: torch.Tensor, parent_ppl: float, args: argparse.Namespace) -> dict:
    """One LoRA (+ routers) run in segments that resume each other, evaluated after each (see the docstring)."""
    import shutil

    from transformers import AutoModelForCausalLM

    from spectra_convert.finetune import finetune

    data = args.train_data
    ckpt, log, out = args.work / "lora-checkpoints", args.work / "lora-log.jsonl", args.work / "lora-out"
    shutil.rmtree(ckpt, ignore_errors=True)
    log.unlink(missing_ok=True)
    tokens_per_step = args.lora_batch * LORA["seq_len"]
    lora = {**LORA, "batch_size": args.lora_batch, "lr": args.lora_lr, "lr_router": args.lora_router_lr,
            "routers": args.lora_routers,
            "lr_schedule": args.lora_schedule, "lr_decay_steps": args.lora_decay_steps,
            "lr_decay_start": args.lora_decay_start,
            "lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r}
    if args.lora_schedule != "constant" and args.lora_decay_steps is None:
        raise SystemExit("--lora-schedule cosine/linear needs --lora-decay-steps (the segments are one run)")
    report = {"parent_ppl": parent_ppl, "carved": str(carved_dir), "settings": vars(args) | {"work": str(args.work)},
              "lora": lora, "tokens_per_step": tokens_per_step, "points": []}

    def point(model, steps: int, minutes: float, wall: float, extra: dict) -> None:
        started = time.perf_counter()
        ppl, recall = routed_eval(model, unseen, args.device)
        row = {"steps": steps, "train_minutes": minutes, "tokens_seen": steps * tokens_per_step,
               "ppl": ppl, "ppl_ratio": ppl / parent_ppl, "recall": recall, "segment_wall_s": wall,
               "eval_s": time.perf_counter() - started, **extra}
        report["points"].append(row)
        (args.work / "lora_curve.json").write_text(json.dumps(report, indent=2, default=str))
        print("lora-curve", json.dumps(row), flush=True)

    model = AutoModelForCausalLM.from_pretrained(carved_dir, trust_remote_code=True).eval().to(args.device)
    report["k"] = model.config.spectra["top_k"]
    point(model, 0, 0.0, 0.0, {})
    del model
    budget, target, trained = args.lora_minutes * 60, args.lora_first_steps, 0.0
    while True:
        started = time.perf_counter()
        teacher = {"distill_from": str(args.gguf.parent), "distill_gguf_file": args.gguf.name} if args.distill else {}
        result = finetune(carved_dir, data, out, steps=target, save_every=50, checkpoint_dir=ckpt, resume=target > args.lora_first_steps,
                          log_every=10, log_file=log, recalibration_tokens=args.recalibration_tokens, force=True,
                          **lora, **teacher)
        wall = time.perf_counter() - started
        trained = training_seconds(log, tokens_per_step)
        summary = json.loads((out / "finetune.json").read_text())
        tuned = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval().to(args.device)
        point(tuned, target, trained / 60, wall,
              {"epochs": target * args.lora_batch / summary["train_blocks"],
               "train_loss_last10": sum(result.losses[-10:]) / len(result.losses[-10:]),
               "validation_ppl": result.eval_after["perplexity"], "validation_cv": result.eval_after["mean_cv"],
               "resumed_from_step": result.resumed_from_step})
        del tuned
        left = args.lora_evals - (len(report["points"]) - 1)
        remaining = int((budget - trained) * target / trained)  # steps that fit in the time left at this speed
        if left <= 0 or remaining < 1 or target == args.lora_decay_steps:
            break
        target += max(1, remaining // left)
        if args.lora_decay_steps is not None:  # a decaying schedule ends there: its last steps train at rate ~0
            target = min(target, args.lora_decay_steps)
    return report


def print_curve(report: dict) -> None:
    points = report["points"]
    last = points[-1]
    print(f"\nLoRA curve (routers: {report['lora']['routers']}){' distilled from the parent' if report['settings'].get('distill') else ''}, k={report['k']}, carved {report['carved']}: parent perplexity "
          f"{report['parent_ppl']:.3f}; {last['steps']} steps in {last['train_minutes']:.1f} training minutes "
          f"({last['steps'] / max(last['train_minutes'], 1e-9):.1f} steps/min), {sum(p['segment_wall_s'] for p in points) / 60:.1f} "
          f"minutes of finetune calls in all; bias re-corrected on {report['settings']['recalibration_tokens']} tokens")
    print("| steps | minutes | tokens seen | ppl ratio | recall | segment wall (s) |")
    print("|---|---|---|---|---|---|")
    for p in points:
        print(f"| {p['steps']} | {p['train_minutes']:.1f} | {p['tokens_seen']:,} | {p['ppl_ratio']:.3f}x | "
              f"{p['recall']:.3f} | {p['segment_wall_s']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/spectra-carve-bench"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calibration-tokens", type=int, default=32768,
                        help="calibration tokens of the carve and of the fitted gates (the converter's carve default)")
    parser.add_argument("--calibration", type=Path, default=CALIBRATION,
                        help="calibration text of the carve and of the fitted gates (default: the shipped 41k-token "
                             "corpus; a larger one: scripts/build_corpus.py --training-out FILE)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--top-k", default="1,2,5",
                        help="routed experts per token to measure (of 8; at the default shared fraction 5/12: 49%%, 56%%, "
                             "78%% of the neurons active; ~25%% needs --shared-fraction 0.125 --top-k 1); '' measures "
                             "only the folder's routers as written")
    parser.add_argument("--router-steps", type=int, default=None,
                        help="the routers' listwise steps after the ridge fit (default: the converter's)")
    parser.add_argument("--router-ridge", type=float, default=None,
                        help="the table's SPECTRA rows: ridge strength of the router fit (default: the converter's)")
    parser.add_argument("--shared-fraction", type=float, default=None)
    parser.add_argument("--carve-refit", default="none")
    parser.add_argument("--finetune-steps", type=int, default=40, help="0 skips the LoRA fine-tune")
    parser.add_argument("--finetune-k", type=int, default=2, help="top-k of the carve made here (56%% active at 5/12)")
    parser.add_argument("--timing-repeats", type=int, default=3, help="0 skips timing")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--skip-balance", action="store_true")
    parser.add_argument("--bias-modes", default=",".join(BIAS_MODES), help="--balance-only: variants to measure")
    parser.add_argument("--balance-only", action="store_true",
                        help="only the bias-variant study (item 8) on --carved DIR as written")
    parser.add_argument("--timing-only", action="store_true",
                        help="only the time-per-token section (for a quiet machine; pair with --carved)")
    parser.add_argument("--carved", type=Path, default=None,
                        help="measure / time / fine-tune this carved folder (e.g. WORK/carved of an earlier run) "
                             "instead of carving again")
    parser.add_argument("--recalibration-tokens", type=int, default=8192,
                        help="training tokens finetune re-corrects the dual biases on after training")
    parser.add_argument("--lora-minutes", type=float, default=0.0,
                        help="only the LoRA curve: about this many minutes of training, one run in segments")
    parser.add_argument("--lora-evals", type=int, default=6, help="curve points after step 0")
    parser.add_argument("--train-data", type=Path, default=CALIBRATION,
                        help="LoRA-curve training text (default: the 41k-token calibration corpus; a larger set: "
                             "scripts/build_corpus.py --training-out FILE)")
    parser.add_argument("--lora-router-lr", type=float, default=LORA["lr_router"],
                        help="LoRA curve: the routers' learning rate when they train")
    parser.add_argument("--lora-lr", type=float, default=LORA["lr"], help="LoRA curve: the adapters' learning rate (default: finetune's, 1e-3 for a carve)")
    parser.add_argument("--lora-routers", choices=("auto", "train", "freeze"), default="auto",
                        help="LoRA curve: finetune --routers (auto: a carved model's routers stay frozen)")
    parser.add_argument("--distill", action="store_true",
                        help="LoRA curve: distil from the dense parent (finetune --distill-from) instead of the LM loss")
    parser.add_argument("--lora-first-steps", type=int, default=20, help="the first segment (it measures the speed)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA curve: the adapters' rank (alpha 2r, finetune's ratio)")
    parser.add_argument("--lora-batch", type=int, default=LORA["batch_size"],
                        help="LoRA curve: blocks of 256 tokens per step (fewer: more steps in the same minutes)")
    parser.add_argument("--lora-schedule", default="constant", help="LoRA curve: finetune --lr-schedule")
    parser.add_argument("--lora-decay-start", type=int, default=0, help="LoRA curve: finetune --lr-decay-start")
    parser.add_argument("--lora-decay-steps", type=int, default=None,
                        help="LoRA curve with a decaying schedule: the steps it spans (fixed up front, so the segments "
                             "are one run; the curve stops there)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from spectra_convert.surgery.upcycle import load_dense_parent
    from tests.conftest import smollm2_gguf_path

    device = args.device
    args.work.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_gguf_path()
    ks = [int(k) for k in args.top_k.split(",") if k]  # --top-k "": only the folder's routers as written
    if args.timing_only:
        parent, tokenizer = load_dense_parent(gguf.parent, gguf.name, torch.float32)
        carved_dir = given_or_carved(gguf, args)
        t = timing(parent.to(device), carved_dir, blocks_of(tokenizer, CORPUS / "unseen.jsonl", 1024), args)
        (args.work / "carve_timing.json").write_text(json.dumps(t, indent=2))
        print_timing(t, device)
        return
    if args.balance_only:
        if args.carved is None:
            sys.exit("--balance-only needs --carved DIR")
        balance_only(gguf, args)
        return
    if args.lora_minutes > 0:
        args.gguf = gguf  # the teacher of --distill
        carved_dir = given_or_carved(gguf, args)
        parent, tokenizer = load_dense_parent(gguf.parent, gguf.name, torch.float32)
        unseen = blocks_of(tokenizer, CORPUS / "unseen.jsonl", args.eval_tokens)
        parent_ppl = perplexity(parent.to(device), unseen, device)
        del parent
        print_curve(lora_curve(carved_dir, unseen, parent_ppl, args))
        return
    carve_seconds, calibration_recall = None, None
    if args.carved is not None:  # an earlier run's WORK/carved (the carve takes minutes and does not depend on k)
        carved_dir = args.carved
    else:
        carved_dir = args.work / "carved"
        started = time.perf_counter()
        calibration_recall = carve_parent(gguf, carved_dir, args).calibration_recall
        carve_seconds = time.perf_counter() - started
    parent, tokenizer = load_dense_parent(gguf.parent, gguf.name, torch.float32)
    parent.to(device)
    unseen = blocks_of(tokenizer, CORPUS / "unseen.jsonl", args.eval_tokens)
    calibration = blocks_of(tokenizer, args.calibration, args.calibration_tokens)
    parent_ppl = perplexity(parent, unseen, device)
    model = AutoModelForCausalLM.from_pretrained(carved_dir, trust_remote_code=True).eval().to(device)
    knobs = model.config.spectra
    shared, width = knobs["shared_intermediate_size"], knobs["intermediate_size"]
    written_k = knobs["top_k"]  # the folder's own k (--finetune-k only when carved here)
    beta = float(knobs.get("sequence_balance", 0.0))  # the folder's per-sequence term: the rows route as it would
    inputs = capture_block_inputs(model, calibration, device) if ks or not args.skip_balance else []
    rows, report = [], {"parent_ppl": parent_ppl, "carve_seconds": carve_seconds, "settings": vars(args) | {"work": str(args.work)}}

    native = routed_eval(model, unseen, device)  # the converter's own routers, as written
    report["converter_routers"] = {"k": written_k, "ppl_ratio": native[0] / parent_ppl, "recall": native[1],
                                   "calibration_recall": calibration_recall}
    for k in ks:
        active = (shared + k * width) / (shared + 8 * width)
        gates = fit_routers(model, inputs, k, args.router_steps, beta, device, args.router_ridge)
        row = {"k": k, "active": active}
        fit_estimates(model, inputs, k, "spectra", gates)
        ppl, recall = routed_eval(model, unseen, device)
        row["spectra"], row["spectra_recall"] = ppl / parent_ppl, recall
        saved = estimates_off(model)
        row["spectra_no_estimate"] = routed_eval(model, unseen, device)[0] / parent_ppl
        estimates_on(model, saved)
        for how in ("oracle", "linear", "linear_balanced", "random"):
            if how == "linear_balanced":  # the gate made to pay for even loads, as the SPECTRA router does
                row["linear_balanced_calibration_cv"] = statistics.mean(g.balance_loads(x, k) for g, x in zip(gates, inputs))
            route = "linear" if how == "linear_balanced" else how
            fit_estimates(model, inputs, k, route, gates)
            saved = with_routing(model, route, k, gates)
            ppl, recall = routed_eval(model, unseen, device)
            restore(model, saved)
            row[how], row[f"{how}_recall"] = ppl / parent_ppl, recall
        rows.append(row)
        print(json.dumps(row), flush=True)
    report["rows"] = rows

    if not args.skip_balance:  # item 8, on the converter's k, routers refitted as written
        fit_routers(model, inputs, written_k, args.router_steps, 0.0, device)
        report["balance"] = bias_mode_study(model, tokenizer, inputs, unseen, parent_ppl, device)

    if args.finetune_steps > 0:
        from spectra_convert.finetune import finetune

        tuned_dir = args.work / "carved-lora"
        ft = finetune(carved_dir, CALIBRATION, tuned_dir,
                      steps=args.finetune_steps, save_every=0, log_every=max(1, args.finetune_steps // 8),
                      recalibration_tokens=args.recalibration_tokens, force=True, **LORA)
        tuned = AutoModelForCausalLM.from_pretrained(tuned_dir, trust_remote_code=True).eval().to(device)
        ppl, recall = routed_eval(tuned, unseen, device)
        report["finetuned"] = {"k": written_k, "steps": args.finetune_steps, "ppl_ratio": ppl / parent_ppl,
                               "recall": recall, "losses": ft.losses if hasattr(ft, "losses") else None}
        print("finetuned", json.dumps(report["finetuned"]), flush=True)

    if args.timing_repeats > 0:
        report["timing"] = timing(parent, carved_dir, unseen, args)

    (args.work / "carve_bench.json").write_text(json.dumps(report, indent=2, default=str))
    took = f"carve took {carve_seconds:.0f} s" if carve_seconds is not None else f"carve given: {carved_dir}"
    print(f"\nparent perplexity on unseen text: {parent_ppl:.3f}; {took}")
    native = report["converter_routers"]
    print(f"the folder's routers as written (top-{native['k']}): {native['ppl_ratio']:.3f}x, "
          f"oracle recall {native['recall']:.3f}")
    print("| active FFN | k | oracle | SPECTRA router | linear gate | linear gate, balanced | random | "
          "SPECTRA, no estimate | recall SPECTRA / linear / balanced linear / random |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['active']:.0%} | {r['k']} | {r['oracle']:.3f}x | {r['spectra']:.3f}x | {r['linear']:.3f}x | "
              f"{r['linear_balanced']:.3f}x | {r['random']:.3f}x | {r['spectra_no_estimate']:.3f}x | "
              f"{r['spectra_recall']:.3f} / {r['linear_recall']:.3f} / {r['linear_balanced_recall']:.3f} / "
              f"{r['random_recall']:.3f} |")
    if "finetuned" in report:
        f = report["finetuned"]
        print(f"after finetune --mode lora ({f['steps']} steps, k={f['k']}): {f['ppl_ratio']:.2f}x, recall {f['recall']:.3f}")
    if "balance" in report:
        print_bias_modes(report["balance"])
    if "timing" in report:
        print_timing(report["timing"], device)


if __name__ == "__main__":
    main()
