"""Configuration of a SPECTRA mixture-of-experts causal LM.

A SPECTRA model is a *parent* causal LM (llama, mistral, qwen2, qwen3, gpt2 — or an MoE parent such as
mixtral, qwen2_moe, qwen3_moe, olmoe) whose feed-forward layers are routed by SPECTRA. The config therefore
holds two things:

* ``text_config`` — the parent architecture's own config, untouched. It is stored under the name
  transformers uses for the text part of composite models, so ``get_text_config()``, ``generate()`` and the
  cache machinery all see the parent's layer count, heads and vocabulary.
* ``spectra`` — every routing knob, in one block (see ``SPECTRA_DEFAULTS``).

This file ships verbatim inside every converted model folder: it imports only torch/transformers.
Invalid knobs raise ``ValueError`` naming the field when the config is built, not deep inside a forward.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

#: Dense parents: the FFN at ``mlp`` is replaced by a SPECTRA MoE block (upcycling).
DENSE_PARENTS = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
#: MoE parents: the experts are kept and only the gate at ``mlp.gate`` is replaced (rerouting).
MOE_PARENTS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
SUPPORTED_PARENTS = DENSE_PARENTS + MOE_PARENTS

#: Every routing knob with its default: the SPECTRA paper's hyper-parameters, adapted as docs/ARCHITECTURE.md ("Routing") says.
SPECTRA_DEFAULTS: dict[str, Any] = {
    "num_experts": 8,  # E: experts per MoE layer
    "top_k": 2,  # k: experts each token uses
    "router_dim": 128,  # d: size of the GRU state and of the expression space
    "temperature": 0.1,  # tau: cosine scores are divided by it (scores live in [-1, 1])
    "repulsion": 0.5,  # lambda of the OSR repulsive cost; 0 disables repulsion
    "sinkhorn_iters": 20,  # fixed number of log-domain Sinkhorn iterations
    "balance_mode": "dual_bias",  # "dual_bias" (per-token, batch-invariant) | "in_batch" (paper-literal)
    "sequence_balance": 1.0,  # beta: per-sequence running-load correction of selection (0 = off), see router
    "bias_ema": 0.05,  # EMA rate of the Sinkhorn column potentials into the dual bias (training)
    "bias_update_rate": 0.05,  # hard-load correction of the bias each training step (0 = off): the soft
    # Sinkhorn EMA alone drifts towards soft balance and let router fine-tunes lose hard balance (CV 0.09 -> 0.33)
    "router_entropy_coef": 0.1,  # weight of the mean per-token routing entropy in the router aux loss
    "ortho_loss_coef": 0.01,  # weight of ||P P^T - I||_F^2 on the expression projector in the router aux loss
    "router_aux_loss_coef": 1.0,  # loss = LM loss + this * aux_loss, only with output_router_logits=True
    # (transformers' MoE convention: with labels alone ``loss`` is the LM loss)
    "use_gru": True,  # ablation: False makes the router stateless (z from h_t alone)
    "use_projector": True,  # ablation: False scores normalize([h; r]) directly against expert vectors
    "expert_kind": "gated",  # "gated" (SwiGLU-style, llama) | "mlp" (GELU with biases, gpt2); dense parents
    "intermediate_size": None,  # per-expert hidden size; None = the parent's
    "hidden_act": None,  # expert activation; None = the parent's
    "shared_expert": False,  # add an always-on dense expert next to the routed ones
    "shared_intermediate_size": None,  # its hidden size; None = the parent's
    "expert_combine": "softmax",  # "softmax": weighted mean of the selected experts (copies of one FFN);
    # "sum": shared + sum of expert_scale[e] * expert_e (carved experts: disjoint neuron slices whose sum is the FFN)
    "skipped_estimate_rank": 0,  # carved blocks: rank of the linear estimate of the unselected experts' sum (0 = none)
    "skipped_estimate_top_k": None,  # the top_k that estimate was fitted at (it is scaled by (E - k) / (E - this))
    "carve_bias": "recall",  # carved routers' dual bias, as the converter and post-fine-tune recalibration set it:
    # "balance" (the hard-load balancing bias) | "recall" (its strongest share keeping held-out oracle recall)
    "source": "upcycled",  # "upcycled" (dense parent) | "rerouted" (MoE parent, experts kept)
}

_BALANCE_MODES = ("dual_bias", "in_batch")
_EXPERT_KINDS = ("gated", "mlp")
_COMBINES = ("softmax", "sum")
CARVE_BIAS_RULES = ("balance", "recall")


def _validate_spectra(knobs: dict[str, Any], parent_type: str | None) -> None:
    """Raise ValueError naming the offending field for any inconsistent routing knob."""
    unknown = sorted(set(knobs) - set(SPECTRA_DEFAULTS))
    if unknown:
        raise ValueError(f"spectra.{unknown[0]}: unknown field; allowed fields: {', '.join(SPECTRA_DEFAULTS)}")
    e, k, d = knobs["num_experts"], knobs["top_k"], knobs["router_dim"]
    if not isinstance(e, int) or e < 2:
        raise ValueError(f"spectra.num_experts must be an integer >= 2, got {e!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"spectra.top_k must be an integer >= 1, got {k!r}")
    if k > e:
        raise ValueError(f"spectra.top_k ({k}) must not exceed spectra.num_experts ({e})")
    if not isinstance(d, int) or d <= 0:
        raise ValueError(f"spectra.router_dim must be a positive integer, got {d!r}")
    if not knobs["router_aux_loss_coef"] >= 0:
        raise ValueError(f"spectra.router_aux_loss_coef must be >= 0, got {knobs['router_aux_loss_coef']!r}")
    if not knobs["temperature"] > 0:
        raise ValueError(f"spectra.temperature must be > 0, got {knobs['temperature']!r}")
    if knobs["sequence_balance"] < 0:
        raise ValueError(f"spectra.sequence_balance must be >= 0, got {knobs['sequence_balance']!r}")
    if knobs["repulsion"] < 0:
        raise ValueError(f"spectra.repulsion must be >= 0, got {knobs['repulsion']!r}")
    if not isinstance(knobs["sinkhorn_iters"], int) or knobs["sinkhorn_iters"] < 1:
        raise ValueError(f"spectra.sinkhorn_iters must be an integer >= 1, got {knobs['sinkhorn_iters']!r}")
    if knobs["balance_mode"] not in _BALANCE_MODES:
        raise ValueError(f"spectra.balance_mode must be one of {_BALANCE_MODES}, got {knobs['balance_mode']!r}")
    if knobs["expert_kind"] not in _EXPERT_KINDS:
        raise ValueError(f"spectra.expert_kind must be one of {_EXPERT_KINDS}, got {knobs['expert_kind']!r}")
    if knobs["expert_combine"] not in _COMBINES:
        raise ValueError(f"spectra.expert_combine must be one of {_COMBINES}, got {knobs['expert_combine']!r}")
    if knobs["expert_combine"] == "sum" and parent_type in MOE_PARENTS:
        raise ValueError("spectra.expert_combine 'sum' is for carved dense parents, not the MoE parent "
                         f"{parent_type!r}")
    if knobs["carve_bias"] not in CARVE_BIAS_RULES:
        raise ValueError(f"spectra.carve_bias must be one of {CARVE_BIAS_RULES}, got {knobs['carve_bias']!r}")
    rank, fitted_k = knobs["skipped_estimate_rank"], knobs["skipped_estimate_top_k"]
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"spectra.skipped_estimate_rank must be an integer >= 0, got {rank!r}")
    if rank and knobs["expert_combine"] != "sum":
        raise ValueError("spectra.skipped_estimate_rank needs spectra.expert_combine 'sum' (carved experts)")
    if rank and not (isinstance(fitted_k, int) and 1 <= fitted_k < e):
        raise ValueError(f"spectra.skipped_estimate_top_k must be an integer in [1, num_experts) when "
                         f"skipped_estimate_rank > 0, got {fitted_k!r}")
    if knobs["source"] not in ("upcycled", "rerouted"):
        raise ValueError(f"spectra.source must be 'upcycled' or 'rerouted', got {knobs['source']!r}")
    if parent_type in MOE_PARENTS and knobs["source"] != "rerouted":
        raise ValueError(f"spectra.source must be 'rerouted' for the MoE parent {parent_type!r}")


def active_ffn_fraction(knobs: dict[str, Any]) -> float:
    """Share of the parent's FFN neurons a token runs in a carved model: (shared + k * expert width) / total."""
    shared = int(knobs.get("shared_intermediate_size") or 0) if knobs.get("shared_expert") else 0
    width = int(knobs["intermediate_size"])
    return (shared + knobs["top_k"] * width) / (shared + knobs["num_experts"] * width)


def skipped_estimate_share(knobs: dict[str, Any]) -> float:
    """The skipped-experts estimate's multiply-adds per token as a share of the parent FFN's: ``2 r H`` against
    ``3 H`` per neuron (gate, up, down; ``2 H`` for gpt2's MLP), so the width H cancels. 0 without an estimate or
    at top-k = E (where the block skips it)."""
    rank = int(knobs.get("skipped_estimate_rank") or 0)
    if not rank or knobs["top_k"] >= knobs["num_experts"]:
        return 0.0
    shared = int(knobs.get("shared_intermediate_size") or 0) if knobs.get("shared_expert") else 0
    neurons = shared + knobs["num_experts"] * int(knobs["intermediate_size"])
    per_neuron = 2 if knobs.get("expert_kind") == "mlp" else 3
    return 2 * rank / (per_neuron * neurons)


class SpectraConfig(PretrainedConfig):
    """Config of ``SpectraForCausalLM``: the parent's config (``text_config``) plus the ``spectra`` knobs."""

    model_type = "spectra"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        text_config: dict[str, Any] | PretrainedConfig | None = None,
        spectra: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            parent_type = text_config.pop("model_type", None)
            if parent_type not in SUPPORTED_PARENTS:
                raise ValueError(
                    f"text_config.model_type: unsupported parent architecture {parent_type!r}; "
                    f"supported: {', '.join(SUPPORTED_PARENTS)}"
                )
            text_config = AutoConfig.for_model(parent_type, **text_config)
        elif text_config is not None and getattr(text_config, "model_type", None) not in SUPPORTED_PARENTS:
            raise ValueError(
                f"text_config.model_type: unsupported parent architecture {text_config.model_type!r}; "
                f"supported: {', '.join(SUPPORTED_PARENTS)}"
            )
        self.text_config = text_config
        parent_type = text_config.model_type if text_config is not None else None

        knobs = dict(SPECTRA_DEFAULTS)
        knobs.update(spectra or {})
        if parent_type in MOE_PARENTS and not (spectra or {}).get("source"):
            knobs["source"] = "rerouted"
        _validate_spectra(knobs, parent_type)
        self.spectra = knobs

        if text_config is not None:
            # Generation needs these at the top level (pad/eos for generate, tying for save/load).
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                kwargs.setdefault(name, getattr(text_config, name, None))
            kwargs.setdefault("tie_word_embeddings", getattr(text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
