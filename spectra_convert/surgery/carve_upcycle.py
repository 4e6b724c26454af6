"""``upcycle --method carve``: a dense parent -> a cheaper SPECTRA MoE made of its own neurons.

Flow (docs/ARCHITECTURE.md, carving): load the parent, run it over the calibration text one decoder layer at a
time (``surgery.layerwise``: only the residual stream and one layer's FFN inputs are held, whatever the amount of
text), and as each layer's FFN inputs appear carve the FFN (``surgery.carve``), fit the layer's SPECTRA router to
the oracle and calibrate its dual bias (``router.oracle_fit``), and stream the layer's tensors into the shard
writer; the parent's other tensors follow. The output folder is atomic like every upcycle's. Blocks combine with
``expert_combine: "sum"`` and carry a shared expert; ``expert_scale`` starts at 1 (all experts on = parent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..console import human_bytes, progress, summary_table
from ..router.calibrate import CALIBRATION_SEQ_LEN, calibration_batches
from ..router.loads import calibration_cv_row
from ..router.oracle_fit import ROUTER_STEPS
from ..errors import UserError
from ..modelcard import write_model_card
from ..modelio.checkpoint import ShardWriter
from ..modelio.config import read_parent_config
from ..modelio.outdir import atomic_output_dir
from ..modelio.parent import load_dense_parent
from ..modelio.side_files import write_runtime_files, write_spectra_config
from ..modeling.configuration_spectra import CARVE_BIAS_RULES
from .carve import (GROUPINGS, SKIPPED_ESTIMATE_RANK, carve_tensors, contributions, expert_outputs,
                    fit_skipped_estimate, intermediate_activations, oracle_mass, plan_carve, refit_scales, shared_size,
                    skipped_output_of)
from .layerwise import layerwise_ffn_inputs

#: Default share of the parent's FFN neurons kept in the always-on shared expert: 5/12, so that at E = 8 top-2 runs
#: 56% and top-5 78% of the neurons. At an equal active share a wider shared expert and fewer routed picks carve
#: better: the router then only decides the rarely active neurons, and what it misses costs less (SmolLM2-135M,
#: unseen changelog text, `validate` perplexity ratio: 56% active 1.715x with 12.5% shared + top-4, 1.557x with 30%
#: + top-3, 1.562x with 5/12 + top-2; 78% active 1.233x with 12.5% + top-6, 1.205x with 5/12 + top-5, 1.197x with
#: 56% + top-4; docs/CARVING.md, "Shared fraction"). 12.5% (the default until 2026-12-06) still reaches ~25%.
SHARED_FRACTION = 5 / 12
#: Default router width (GRU state and expression space) of a carved model. A carved router is a ridge gate on the
#: FFN input plus what the GRU state adds, and the state's width did not matter for it (SmolLM2-135M, 8 + shared,
#: top-4: held-out calibration recall 0.758 at d = 16, 32 and 128; unseen changelog text ppl ratio 2.70x / 2.61x /
#: 2.71x, recall 0.735 / 0.735 / 0.733), while it costs time: the GRU recurrence is the largest part of a carved
#: block at prefill (docs/ARCHITECTURE.md, "Runtime speed") and its input weights are read on every decoded token.
CARVE_ROUTER_DIM = 32
#: Default calibration tokens of a carve (copies use 8192). Carving is fitted on them -- neuron statistics,
#: co-activation clusters, the routers' ridge start and recall-checked steps -- and more text helped on unseen
#: text (SmolLM2-135M, defaults, d = 32: ppl ratio 2.61x / recall 0.735 at 8192, 2.43x / 0.746 at 32768), at about
#: four times the carve's calibration work. The shipped corpus holds ~41k tokens.
CARVE_CALIBRATION_TOKENS = 32768
#: Fewest calibration sequences a carve fits on: with one, nothing is held out, and the carve's report of its router
#: fit and estimate (held-out recall, share explained) would read nan.
CARVE_MIN_SEQUENCES = 2


def check_calibration_size(tokens: int, what: str = "--calibration-tokens is") -> None:
    """One-line ``UserError`` when a carve would calibrate on fewer than ``CARVE_MIN_SEQUENCES`` sequences: checked on
    the option before any work, and on the packed text (a short ``--calibration`` file gives fewer tokens)."""
    needed = CARVE_MIN_SEQUENCES * CALIBRATION_SEQ_LEN
    if tokens < needed:
        raise UserError(f"--method carve: {what} {tokens} tokens; a carve needs at least {needed} ({CARVE_MIN_SEQUENCES} "
                        f"sequences of {CALIBRATION_SEQ_LEN}, part of them held out to check the router fit): raise "
                        "--calibration-tokens or give more --calibration text")


REFITS = ("none", "scale")
#: The carve's dual-bias rule (knob ``carve_bias``): the whole hard-load balancing bias. Measured on SmolLM2-135M at
#: top-4 with the skipped-experts estimate (docs/CARVING.md): perplexity on unseen text 1.91x the parent against
#: 1.80x under ``recall`` (the strongest share that keeps held-out oracle recall), load CV on four unseen domains
#: 0.144 against 0.263: the balance target (CV < 0.15) and the 2.0x quality target at once.
CARVE_BIAS = "balance"
#: The per-sequence balance term (knob ``sequence_balance``, beta) a carve writes. 0 until 2026-12-06, when the
#: term's 16-token chunk loop made a carve's prefill slower than its parent's (512-token forward 1.05x against
#: 0.94x at beta 0); it is now one compiled call per router and costs no time (docs/ARCHITECTURE.md, "Runtime
#: speed"), so the default follows the balance it buys: on four unseen domains load CV mean 0.150 -> 0.107 for +1.0%
#: perplexity (+0.1% on unseen changelogs; docs/CARVING.md, "The carve at today's defaults").
CARVE_SEQUENCE_BALANCE = 0.5


@dataclass
class CarveOptions:
    """Knobs of a carve (every one has a measured default; see docs/CARVING.md)."""

    shared_fraction: float = SHARED_FRACTION
    grouping: str = "coactivation"
    refit: str = "none"
    router_steps: int = ROUTER_STEPS
    active_fraction: float = 0.25
    skipped_rank: int = SKIPPED_ESTIMATE_RANK
    bias_rule: str = CARVE_BIAS

    def check(self) -> None:
        if not 0.0 < self.shared_fraction < 1.0:
            raise UserError(f"--shared-fraction must be in (0, 1), got {self.shared_fraction}")
        if self.grouping not in GROUPINGS:
            raise UserError(f"--carve-grouping must be one of {', '.join(GROUPINGS)}, got {self.grouping!r}")
        if self.refit not in REFITS:
            raise UserError(f"--carve-refit must be one of {', '.join(REFITS)}, got {self.refit!r}")
        if self.router_steps < 0:
            raise UserError(f"--router-steps must be >= 0, got {self.router_steps}")
        if self.skipped_rank < 0:
            raise UserError(f"--skipped-estimate-rank must be >= 0, got {self.skipped_rank}")
        if self.bias_rule not in CARVE_BIAS_RULES:
            raise UserError(f"--carve-bias must be one of {', '.join(CARVE_BIAS_RULES)}, got {self.bias_rule!r}")


@dataclass
class CarvedLayer:
    """One layer's output tensors (names relative to the layer's ``mlp.`` prefix) and its fit statistics."""

    tensors: dict[str, torch.Tensor]
    calibration_cv: float
    calibration_recall: float
    stats: dict[str, float] = field(default_factory=dict)


_PARAM = {"gate_up": "gate_up_proj", "down": "down_proj", "up": "up_proj", "up_bias": "up_bias",
          "down_bias": "down_bias"}


def carve_knobs(intermediate: int, experts: int, shared_fraction: float, *, top_k: int, skipped_rank: int,
                hidden: int, bias_rule: str = CARVE_BIAS) -> dict[str, Any]:
    """The ``spectra`` config knobs a carve sets: widths of the routed and shared experts, the sum combine rule,
    the per-sequence balance at ``CARVE_SEQUENCE_BALANCE`` (weak: a strong one runs neurons that should stay off;
    docs/CARVING.md measures it), and
    the projector-orthogonality loss off: a carved router's projector holds the ridge fit to the oracle, whose
    rows are not orthonormal (||P P^T - I||^2 was 67-1352 per layer on SmolLM2, mean 381), so at the default
    coefficient the penalty dominated fine-tuning's router loss and pulled the fit apart (docs/ARCHITECTURE.md,
    carving). With ``skipped_rank`` > 0 and some experts unselected (top_k < E), blocks carry the skipped-experts
    estimate of that rank (at most ``hidden``), fitted at ``top_k``. ``bias_rule``: how the routers' dual bias is
    calibrated (``carve_bias``; ``oracle_fit.calibrate_carved_bias``), kept for the re-correction after fine-tuning."""
    shared = shared_size(intermediate, experts, shared_fraction)
    rank = min(skipped_rank, hidden) if top_k < experts else 0
    return {"intermediate_size": (intermediate - shared) // experts, "shared_expert": True,
            "shared_intermediate_size": shared, "expert_combine": "sum", "sequence_balance": CARVE_SEQUENCE_BALANCE,
            "ortho_loss_coef": 0.0, "skipped_estimate_rank": rank, "skipped_estimate_top_k": top_k if rank else None,
            "carve_bias": bias_rule}


@torch.no_grad()
def carve_layer(router: Any, dense: dict[str, torch.Tensor], inputs: torch.Tensor, act_fn: Any, options: CarveOptions,
                *, seed: int, skipped_rank: int = 0, bias_rule: str = CARVE_BIAS,
                activations: torch.Tensor | None = None) -> CarvedLayer:
    """Carve one dense FFN: plan on the calibration FFN inputs ``[B, T, H]``, fit and calibrate the layer's
    ``SpectraRouter`` to the oracle, optionally refit the expert scales, fit the skipped-experts estimate to what
    the router's selections drop (``skipped_rank``: the config's ``skipped_estimate_rank``, 0 = none; ``bias_rule``:
    its ``carve_bias``); returns the block's tensors. ``activations``: the FFN's intermediate activations on these
    inputs ``[B * T, I]`` when the caller has them (``layerwise_ffn_inputs`` captures them), else computed here."""
    from ..router.oracle_fit import (calibrate_carved_bias, fit_spectra_router, heldout_token_mask, oracle_topk,
                                     router_selection, selection_cv, topk_recall)

    experts, top_k = router.num_experts, router.top_k
    flat = inputs.reshape(-1, inputs.shape[-1]).float()
    acts = activations if activations is not None else intermediate_activations(dense, flat, act_fn)
    plan = plan_carve(contributions(acts, dense["down"]), experts, options.shared_fraction, grouping=options.grouping,
                      active_fraction=options.active_fraction, seed=seed)
    routed, shared = carve_tensors(dense, plan)
    mass = oracle_mass(acts, dense["down"], plan)
    fit = fit_spectra_router(router, inputs, mass, steps=options.router_steps, seed=seed)
    bias = calibrate_carved_bias(router, inputs, mass, rule=bias_rule)
    selected = router_selection(router, inputs)
    recall = topk_recall(selected, oracle_topk(mass, top_k))
    cv = selection_cv(selected, experts)
    stats = {**fit, "bias_strength": bias["bias_strength"], "heldout_recall": bias["heldout_recall"],
             "balanced_cv": bias["calibration_cv"]}
    scale = torch.ones(experts)
    if options.refit == "scale":  # needs every expert's output at once (E x N x H floats)
        scale = refit_scales(expert_outputs(acts, dense["down"], plan), selected)
    tensors = {}
    if skipped_rank:
        estimate, stats["skipped_explained_heldout"] = fit_skipped_estimate(
            flat, skipped_output_of(acts, dense["down"], plan, selected, scale), skipped_rank,
            holdout=heldout_token_mask(*inputs.shape[:2]))
        tensors.update({f"skipped_estimate.{n}": t for n, t in estimate.items()})
    del acts
    tensors.update({f"experts.{_PARAM[n]}": t for n, t in routed.items()})
    tensors.update({f"shared_expert.{_PARAM[n]}": t for n, t in shared.items()})
    tensors["expert_scale"] = scale
    tensors.update({f"gate.{n}": t.detach().clone() for n, t in router.state_dict().items()})
    return CarvedLayer(tensors, cv, recall, stats)


class LayerCarver:
    """``on_layer`` of ``layerwise_ffn_inputs``: carves each layer as soon as its FFN inputs exist, adds its tensors
    to ``writer`` and lets the inputs go, so at most one layer's calibration activations are held."""

    def __init__(self, writer: Any, spectra_config: Any, adapter: Any, get_dense: Any, options: CarveOptions, *,
                 seed: int, out_dtype: torch.dtype):
        from transformers.activations import ACT2FN

        from ..modeling.modeling_spectra import RoutingContext

        self.writer, self.spectra_config, self.adapter, self.get_dense = writer, spectra_config, adapter, get_dense
        self.options, self.seed, self.out_dtype = options, seed, out_dtype
        self.act_fn = ACT2FN[adapter.activation(spectra_config.text_config)]
        self.context = RoutingContext()
        self.done: list[CarvedLayer] = []

    def __call__(self, i: int, inputs: torch.Tensor, activations: torch.Tensor | None = None) -> None:
        from ..modeling.modeling_spectra import SpectraRouter

        knobs = self.spectra_config.spectra
        router = SpectraRouter(self.spectra_config.text_config.hidden_size, knobs, i, self.context)
        layer = carve_layer(router, self.adapter.ffn_tensors(self.get_dense, i), inputs, self.act_fn, self.options,
                            seed=self.seed + i, skipped_rank=knobs["skipped_estimate_rank"], bias_rule=knobs["carve_bias"],
                            activations=activations)
        prefix = self.adapter.mlp_prefix(i)
        for name, tensor in layer.tensors.items():
            self.writer.add(prefix + name, tensor.to(self.out_dtype).contiguous())
        layer.tensors = {}
        self.done.append(layer)


def _mean(layers: list[CarvedLayer], stat: str) -> float:
    values = [layer.stats[stat] for layer in layers if not math.isnan(layer.stats.get(stat, math.nan))]
    return sum(values) / len(values) if values else math.nan


def carve_upcycle(model: str, out: Path, *, model_dir: Path, adapter: Any, texts: list[str], experts: int, top_k: int,
                  router_dim: int, options: CarveOptions, calibration_tokens: int, out_dtype: torch.dtype,
                  gguf_file: str | None, seed: int, force: bool, overrides: dict) -> Any:
    """The carve branch of ``upcycle`` (arguments already checked there). Returns an ``UpcycleResult``."""
    from ..modeling.configuration_spectra import skipped_estimate_share
    from ..modeling.modeling_spectra import decoder_layers
    from .moe_output import (SHARD_BYTES, UpcycleResult, build_spectra_config, router_param_count,
                             write_generation_config)

    options.check()
    with atomic_output_dir(out, force=force, inputs=[model_dir], durable=True) as tmp:
        parent_config = read_parent_config(model_dir, gguf_file=gguf_file)
        inter = adapter.intermediate_size(parent_config)
        try:
            knobs = carve_knobs(inter, experts, options.shared_fraction, top_k=top_k, skipped_rank=options.skipped_rank,
                                hidden=int(parent_config.hidden_size), bias_rule=options.bias_rule)
        except ValueError as exc:
            raise UserError(f"--shared-fraction: {exc}") from exc
        torch.manual_seed(seed)
        dense, tokenizer = load_dense_parent(model_dir, gguf_file, torch.float32, config=parent_config)
        spectra_config = build_spectra_config(dense.config, adapter, {**knobs, **overrides}, experts=experts, top_k=top_k,
                                         router_dim=router_dim, method="carve", out_dtype=out_dtype)
        try:
            blocks = calibration_batches(tokenizer, texts, max_tokens=calibration_tokens, seed=seed)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        check_calibration_size(blocks.numel(), "the calibration text gives")
        dense_state = dense.state_dict()
        num_layers = adapter.num_layers(parent_config)
        ffn_prefixes = [adapter.mlp_prefix(i) for i in range(num_layers)]
        tied = set(getattr(dense, "_tied_weights_keys", None) or {}) if spectra_config.tie_word_embeddings else set()
        non_ffn = {name: t for name, t in dense_state.items()
                   if not any(name.startswith(p) for p in ffn_prefixes) and name not in tied}
        with ShardWriter(tmp, max_shard_bytes=SHARD_BYTES, background=True, max_queued_shards=1,
                                    streamed=True) as writer, progress() as bar:
            carver = LayerCarver(writer, spectra_config, adapter, dense_state.__getitem__, options, seed=seed,
                                 out_dtype=out_dtype)
            task = bar.add_task("carving layer by layer", total=num_layers)
            down = adapter.projections["down"]  # the FFN's intermediate activation is its input
            layerwise_ffn_inputs(dense, decoder_layers(dense), blocks, on_layer=carver,
                                 output_projection=lambda layer: getattr(layer.mlp, down),
                                 on_progress=lambda _: bar.advance(task))
            layers = carver.done
            for name, tensor in non_ffn.items():
                writer.add(name, tensor.to(out_dtype))
            write_task = bar.add_task("writing shards", total=None)
            writer.close(on_progress=lambda done, total: bar.update(write_task, completed=done, total=total))
        write_spectra_config(tmp, spectra_config)
        write_runtime_files(tmp)
        tokenizer.save_pretrained(tmp)
        write_generation_config(dense, tmp)
        write_model_card(tmp, base_model=str(model))
        width, shared = knobs["intermediate_size"], knobs["shared_intermediate_size"]
        per_neuron = sum(math.prod(s) for s in adapter.ffn_shapes(parent_config).values() if len(s) == 2) // inter
        non_ffn_params = sum(t.numel() for t in non_ffn.values())
        rank, hidden = knobs["skipped_estimate_rank"], spectra_config.text_config.hidden_size
        # per block beyond the neurons: router, expert scales, the estimate (in/out weights and output bias)
        block_params = router_param_count(spectra_config) + experts + (rank * 2 * hidden + hidden if rank else 0)
        total = non_ffn_params + num_layers * (per_neuron * inter + block_params)
        active = non_ffn_params + num_layers * (per_neuron * (shared + top_k * width) + block_params)
        output_bytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    layer_cv = [layer.calibration_cv for layer in layers]
    recall = [layer.calibration_recall for layer in layers]
    result = UpcycleResult(out, experts, top_k, num_layers, total, active, output_bytes, layer_cv)
    result.active_ffn_fraction = (shared + top_k * width) / inter
    result.calibration_recall = sum(recall) / len(recall)
    summary_table(
        f"carved {model} -> {out}",
        ["", "value"],
        [["experts / top-k", f"{experts} / {top_k} (+ shared {shared} neurons, {width} per expert)"],
         ["active FFN neurons", f"{result.active_ffn_fraction:.1%}"],
         ["skipped-experts estimate: rank / FFN compute / held-out share explained",
          f"{rank} / +{skipped_estimate_share(spectra_config.spectra):.1%} / "
          f"{_mean(layers, 'skipped_explained_heldout'):.3f}" if rank else "none"],
         ["MoE layers", num_layers],
         ["params total", f"{total / 1e6:.1f}M"], ["params active per token", f"{active / 1e6:.1f}M"],
         ["output size", human_bytes(output_bytes)],
         ["oracle top-k recall (calibration) mean", f"{result.calibration_recall:.3f}"],
         ["  held-out calibration split: ridge start / fitted", f"{_mean(layers, 'heldout_recall_ridge'):.3f} / "
                                                             f"{_mean(layers, 'heldout_recall_fitted'):.3f}"],
         [f"router steps / dual-bias strength mean (--carve-bias {spectra_config.spectra['carve_bias']})",
          f"{_mean(layers, 'router_steps'):.0f} / {_mean(layers, 'bias_strength'):.2f}"],
         calibration_cv_row(layer_cv)],
    )
    return result
