"""Run a parent model over calibration tokens one decoder layer at a time, straight from its checkpoint.

Why: a router is calibrated on its layer's FFN inputs, and those depend on every layer below. Loading the
whole model to get them is what makes peer tools die on big MoE checkpoints (a gate init that needs the whole
model in memory; docs/ARCHITECTURE.md, "How a router is fitted"). Here the model is built on the meta device
(no memory), only the embeddings and rotary tables are materialised, and each decoder layer is loaded from the
checkpoint, run on the hidden states, and freed. Peak memory: embeddings + one layer's non-expert weights + one
expert + the calibration activations.

Checkpoints store experts per expert (Mixtral legacy ``block_sparse_moe.experts.N.w1|w2|w3``, Qwen/OLMoE
``mlp.experts.N.gate_proj|up_proj|down_proj``) while transformers 5 modules hold them fused
(``mlp.experts.gate_up_proj [E, 2I, H]`` = cat(gate, up) on dim 1, ``mlp.experts.down_proj [E, H, I]``).
Rather than fusing them, ``StreamedExperts`` stands in for the fused module, reading one expert at a time from disk, so not even one
layer's experts are ever resident together.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..modelio.adapters import MoeAdapter, adapter_for
from ..modelio.checkpoint import CheckpointReader
from ..router.tap import RouterTap


def _module_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not inside {type(root).__name__}")


class StreamedExperts(nn.Module):
    """Drop-in for transformers 5's fused ``*Experts`` modules that loads ONE expert at a time from disk.

    Same call as ``MixtralExperts`` / ``Qwen2MoeExperts`` / ``OlmoeExperts``: ``(hidden [N, H], top_k_index
    [N, k], top_k_weights [N, k]) -> [N, H]`` with gated experts ``down(act(gate(x)) * up(x))``. Holding one
    expert instead of a layer's E experts is what keeps calibration memory independent of the model size (one
    Mixtral-8x7B layer's experts are 2.8 GB in bf16; one expert is 350 MB). Matmuls run in the checkpoint's
    dtype when it is bf16 and the CPU has native bf16 kernels (as the layer's attention already does: 2.7x
    faster than converting to float32 on an AVX512-BF16 core), else in float32; outputs accumulate in float32.
    """

    def __init__(self, reader: CheckpointReader, keys: dict[int, dict[str, str]], act_fn: nn.Module):
        super().__init__()
        self.reader, self.keys, self.act_fn = reader, keys, act_fn

    @staticmethod
    def compute_dtype(weight_dtype: torch.dtype) -> torch.dtype:
        if weight_dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.bfloat16
        return torch.float32

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(hidden_states.shape, dtype=torch.float32)
        for expert in torch.unique(top_k_index).tolist():
            token, slot = torch.where(top_k_index == expert)
            weights = {role: self.reader.get(key) for role, key in self.keys[expert].items()}
            dtype = self.compute_dtype(weights["gate"].dtype)
            x = hidden_states[token].to(dtype)
            gate = F.linear(x, weights["gate"].to(dtype))
            up = F.linear(x, weights["up"].to(dtype))
            y = F.linear(self.act_fn(gate) * up, weights["down"].to(dtype)).float()
            # a token appears once per expert, so accumulate-put is exact (and much faster than index_add_ on CPU)
            out.index_put_((token,), y * top_k_weights[token, slot, None].float(), accumulate=True)
        return out.to(hidden_states.dtype)


def _layer_state(reader: CheckpointReader, adapter: Any, disk_layer_prefix: str, i: int
                 ) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, str]]]:
    """Layer ``i``'s non-expert tensors keyed by module name relative to the layer, and its per-expert keys
    (``{expert: {role: on-disk key}}``; empty for a dense layer or an already fused checkpoint)."""
    keys = [k for k in reader.keys() if k.startswith(disk_layer_prefix)]
    state: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[str, str]] = {}
    pattern = None
    if isinstance(adapter, MoeAdapter):
        roles = {name: role for role, name in adapter.expert_names.items()}
        pattern = re.compile(re.escape(adapter.disk_prefix(i)) + r"experts\.(\d+)\.(\w+)\.weight")
    for key in keys:
        match = pattern.fullmatch(key) if pattern else None
        if match and match.group(2) in roles:
            experts.setdefault(int(match.group(1)), {})[roles[match.group(2)]] = key
            continue
        name = adapter.to_module_key(key) if isinstance(adapter, MoeAdapter) else key
        state[name[len(disk_layer_prefix):]] = reader.get(key)
    if experts and (sorted(experts) != list(range(len(experts))) or any(len(r) != 3 for r in experts.values())):
        raise UserError(f"layer {i}: the checkpoint is missing some experts' weights")
    return state, experts


def _mask_kind(config: Any, i: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[i]
    return "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"


def stream_ffn_inputs(
    model_dir: Path,
    config: Any,
    token_batches: list[torch.Tensor],
    *,
    on_layer: Callable[[int, torch.Tensor], None],
    reader: CheckpointReader | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> None:
    """Call ``on_layer(i, ffn_input [B, T, H] float32)`` for every decoder layer, loading one layer at a time.

    ``token_batches`` are ``[B, T]`` LongTensors (no padding; causal attention). ``on_layer`` receives the input of
    ``layer.mlp`` for all batches concatenated along B, and runs in the caller's grad mode (router distillation
    trains inside it); the parent's forward runs without autograd.
    """
    grad_mode = torch.is_grad_enabled()
    with torch.no_grad():
        _stream(model_dir, config, token_batches, on_layer, reader, on_progress, grad_mode)


def _stream(model_dir, config, token_batches, on_layer, reader, on_progress, grad_mode: bool) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    from ..modeling.modeling_spectra import decoder_layers

    reader = reader or CheckpointReader(Path(model_dir))
    adapter = adapter_for(config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    base = skeleton.base_model
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        raise UserError(f"layer-streamed calibration supports rotary decoder models, not {config.model_type}")
    rotary = type(rotary)(config=skeleton.config)  # real inv_freq buffers on CPU (meta ones hold no values)
    embeddings = skeleton.get_input_embeddings()
    embed_key = _module_name(skeleton, embeddings) + ".weight"
    if embed_key not in reader:
        raise UserError(f"{model_dir}: the checkpoint has no {embed_key!r}")
    embeddings.load_state_dict({"weight": reader.get(embed_key)}, assign=True)
    layers = decoder_layers(skeleton)
    layers_name = _module_name(skeleton, layers)

    if len({ids.shape[1] for ids in token_batches}) != 1:
        raise ValueError("all token batches must have the same length")
    # One forward per layer over all tokens: each expert is then read from disk once per layer.
    hidden = [embeddings(torch.cat(token_batches))]
    embeddings.to("meta")  # free it: only the layers are needed from here on
    position_ids = [torch.arange(hidden[0].shape[1]).unsqueeze(0)]
    position_embeddings = [rotary(h, pos) for h, pos in zip(hidden, position_ids)]
    mask_fn = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}

    for i, layer in enumerate(layers):
        state, expert_keys = _layer_state(reader, adapter, f"{layers_name}.{i}.", i)
        if expert_keys:
            layer.mlp.experts = StreamedExperts(reader, expert_keys, layer.mlp.experts.act_fn)
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise UserError(f"layer {i} of {model_dir} does not match its config ({str(exc).splitlines()[0]})") from None
        del state
        captured: list[torch.Tensor] = []
        # nothing after the last router input is needed: the last layer's experts are skipped
        with RouterTap([layer.mlp], inputs=True, outputs=False, stop_after_last=i == len(layers) - 1) as tap:
            for b, h in enumerate(hidden):
                mask = mask_fn[_mask_kind(skeleton.config, i)](
                    config=skeleton.config, inputs_embeds=h, attention_mask=None, past_key_values=None,
                    position_ids=position_ids[b],
                )
                out = tap.run(lambda: layer(h, attention_mask=mask, position_ids=position_ids[b], past_key_values=None,
                                            use_cache=False, position_embeddings=position_embeddings[b]))
                captured.append(tap.take()[0]["inputs"].float())
                if out is not None:
                    hidden[b] = out[0] if isinstance(out, tuple) else out
        layer.to("meta")  # drop this layer's weights before the next one is loaded
        with torch.set_grad_enabled(grad_mode):
            on_layer(i, torch.cat(captured))
        del captured
        if on_progress is not None:
            on_progress(i)
