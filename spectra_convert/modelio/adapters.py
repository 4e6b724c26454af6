"""Architecture adapters: where each supported parent keeps its FFN or MoE, and how the checkpoint stores it.

One registry (``ADAPTERS``) behind one interface, PEFT ``tuners/``-style, so the converters never branch on
``model_type`` themselves. Two kinds:

* ``DenseAdapter`` (gpt2, llama, mistral, qwen2, qwen3) — used by ``upcycle``: where layer i's FFN lives and
  how to read it as ONE expert in ``SpectraExperts`` layout (gated: ``gate_up [2I, H]`` + ``down [H, I]``;
  gpt2: ``up [I, H]`` + biases + ``down [H, I]``; note gpt2's ``Conv1D`` stores weights ``[in, out]``).
* ``MoeAdapter`` (mixtral, qwen2_moe, qwen3_moe, olmoe) — used by ``reroute``: where the old router weight
  sits *on disk* and where the SPECTRA router's tensors go, plus how experts are stored per expert on disk
  (transformers fuses them into ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` at load time).

On-disk names were checked by ``save_pretrained`` of tiny models with transformers 5.23: Mixtral writes the
legacy ``block_sparse_moe.gate.weight`` / ``block_sparse_moe.experts.N.w1|w2|w3.weight``; qwen2_moe, qwen3_moe
and olmoe write ``mlp.gate.weight`` / ``mlp.experts.N.gate_proj|up_proj|down_proj.weight``. qwen2_moe also has
``mlp.shared_expert_gate.weight`` — a sigmoid gate of the shared expert, NOT the router; it is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are built: reroute reads adapters before importing torch
    import torch

Getter = Callable[[str], "torch.Tensor"]


@dataclass(frozen=True)
class DenseAdapter:
    """A dense parent whose FFN at ``mlp`` becomes a SPECTRA MoE block (upcycling)."""

    model_type: str
    layer_prefix: str  # "model.layers.{i}." | "transformer.h.{i}."
    expert_kind: str  # "gated" (SwiGLU) | "mlp" (GELU with biases)
    projections: dict[str, str] = field(default_factory=dict)  # role -> module name inside mlp
    is_moe: bool = False
    gguf_arch: str | None = None  # GGUF ``general.architecture`` whose FFNs ``dense_ffn`` reads straight from the file

    def mlp_prefix(self, i: int) -> str:
        """Key prefix of layer ``i``'s FFN, e.g. ``model.layers.3.mlp.`` (module names = checkpoint names)."""
        return self.layer_prefix.format(i=i) + "mlp."

    def num_layers(self, config: Any) -> int:
        return int(config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layer)

    def intermediate_size(self, config: Any) -> int:
        if self.expert_kind == "mlp":
            return int(getattr(config, "n_inner", None) or 4 * config.hidden_size)
        return int(config.intermediate_size)

    def activation(self, config: Any) -> str:
        return config.activation_function if self.expert_kind == "mlp" else config.hidden_act

    def ffn_shapes(self, config: Any) -> dict[str, tuple[int, ...]]:
        """Shapes of ``ffn_tensors`` from the config alone (upcycle draws expert noise before the weights load)."""
        hidden, inter = int(config.hidden_size), self.intermediate_size(config)
        if self.expert_kind == "gated":
            return {"gate_up": (2 * inter, hidden), "down": (hidden, inter)}
        return {"up": (inter, hidden), "up_bias": (inter,), "down": (hidden, inter), "down_bias": (hidden,)}

    def ffn_tensors(self, get: Getter, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s dense FFN as one expert in ``SpectraExperts`` layout (``get`` maps a key to a tensor)."""
        import torch

        p = self.mlp_prefix(i)
        names = self.projections
        if self.expert_kind == "gated":
            gate, up = get(p + names["gate"] + ".weight"), get(p + names["up"] + ".weight")
            return {"gate_up": torch.cat([gate, up], dim=0), "down": get(p + names["down"] + ".weight")}
        # gpt2 Conv1D: weight [in, out]; SpectraExperts wants nn.Linear's [out, in].
        return {
            "up": get(p + names["up"] + ".weight").T.contiguous(),
            "up_bias": get(p + names["up"] + ".bias"),
            "down": get(p + names["down"] + ".weight").T.contiguous(),
            "down_bias": get(p + names["down"] + ".bias"),
        }


@dataclass(frozen=True)
class MoeAdapter:
    """An MoE parent whose experts are kept and whose router at ``mlp.gate`` is replaced (rerouting)."""

    model_type: str
    moe_prefix: str  # on-disk prefix of layer i's MoE block, e.g. "model.layers.{i}.block_sparse_moe."
    expert_names: dict[str, str]  # role (gate/up/down) -> on-disk per-expert module name (w1/w3/w2, ...)
    num_experts_attr: str
    top_k_attr: str = "num_experts_per_tok"
    expert_kind: str = "gated"
    is_moe: bool = True
    layer_prefix: str = "model.layers.{i}."

    def disk_prefix(self, i: int) -> str:
        return self.moe_prefix.format(i=i)

    def mlp_prefix(self, i: int) -> str:
        """Module-name prefix of layer ``i``'s MoE block (``model.layers.{i}.mlp.``), as the runtime names it."""
        return self.layer_prefix.format(i=i) + "mlp."

    def gate_key(self, i: int) -> str:
        """On-disk key of layer ``i``'s linear router weight ``[E, H]``."""
        return self.disk_prefix(i) + "gate.weight"

    def router_prefix(self, i: int) -> str:
        """On-disk prefix for layer ``i``'s SpectraRouter tensors (the gate's prefix: transformers' own
        checkpoint conversion for the parent maps it to ``mlp.gate.`` at load, exactly as it maps the experts)."""
        return self.disk_prefix(i) + "gate."

    def expert_key(self, i: int, expert: int, role: str) -> str:
        """On-disk key of one expert's projection (``role`` in gate/up/down), unfused as checkpoints store it."""
        return f"{self.disk_prefix(i)}experts.{expert}.{self.expert_names[role]}.weight"

    def num_layers(self, config: Any) -> int:
        return int(config.num_hidden_layers)

    def num_experts(self, config: Any) -> int:
        return int(getattr(config, self.num_experts_attr))

    def top_k(self, config: Any) -> int:
        return int(getattr(config, self.top_k_attr))

    def intermediate_size(self, config: Any) -> int:
        return int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)

    def to_module_key(self, key: str) -> str:
        """Map an on-disk key (non-expert) to the module name of the parent model in transformers 5."""
        return key.replace(".block_sparse_moe.", ".mlp.")


_LLAMA_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

ADAPTERS: dict[str, DenseAdapter | MoeAdapter] = {
    "gpt2": DenseAdapter("gpt2", "transformer.h.{i}.", "mlp", {"up": "c_fc", "down": "c_proj"}),
    "llama": DenseAdapter("llama", "model.layers.{i}.", "gated", _LLAMA_PROJ, gguf_arch="llama"),
    "mistral": DenseAdapter("mistral", "model.layers.{i}.", "gated", _LLAMA_PROJ, gguf_arch="mistral"),
    "qwen2": DenseAdapter("qwen2", "model.layers.{i}.", "gated", _LLAMA_PROJ, gguf_arch="qwen2"),
    "qwen3": DenseAdapter("qwen3", "model.layers.{i}.", "gated", _LLAMA_PROJ, gguf_arch="qwen3"),
    "mixtral": MoeAdapter("mixtral", "model.layers.{i}.block_sparse_moe.", {"gate": "w1", "up": "w3", "down": "w2"},
                          "num_local_experts"),
    "qwen2_moe": MoeAdapter("qwen2_moe", "model.layers.{i}.mlp.", _LLAMA_PROJ, "num_experts"),
    "qwen3_moe": MoeAdapter("qwen3_moe", "model.layers.{i}.mlp.", _LLAMA_PROJ, "num_experts"),
    "olmoe": MoeAdapter("olmoe", "model.layers.{i}.mlp.", _LLAMA_PROJ, "num_experts"),
}

DENSE_TYPES = tuple(k for k, a in ADAPTERS.items() if not a.is_moe)
MOE_TYPES = tuple(k for k, a in ADAPTERS.items() if a.is_moe)
#: GGUF ``general.architecture`` -> transformers model_type, for the parents whose GGUF FFNs are read directly
GGUF_ARCHS = {a.gguf_arch: k for k, a in ADAPTERS.items() if isinstance(a, DenseAdapter) and a.gguf_arch}


def supported_message() -> str:
    return (f"supported: {', '.join(DENSE_TYPES)} (dense, for upcycle); {', '.join(MOE_TYPES)} (MoE, for reroute) — "
            "a converter must know where a parent keeps its FFN or router (docs/ARCHITECTURE.md, "
            "\"Adding a parent architecture\")")


def adapter_for(config: Any) -> DenseAdapter | MoeAdapter:
    """The adapter of a parent config; a one-line ``UserError`` listing the supported ones otherwise."""
    model_type = getattr(config, "model_type", None) or (config.get("model_type") if isinstance(config, dict) else None)
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise UserError(f"unsupported architecture {model_type!r}; {supported_message()}")
    return adapter
