"""Run a loaded decoder over calibration tokens one layer at a time, handing each layer's FFN input on.

Why: fitting routers (and, for a carve, the experts themselves) wants a lot of calibration text, and holding every
layer's FFN inputs at once costs layers x tokens x hidden floats before any fitting starts: 30 x 131072 x 576 x 4 B
= 9 GB for a SmolLM2-135M carve on 131072 tokens, half of that carve's 18.9 GB peak (docs/ARCHITECTURE.md,
"Carving"). Layer by layer, only the residual stream of all tokens (tokens x hidden) and one layer's FFN inputs are
held, and every value is the same: each layer computes the same function of the same input, in the same chunks.
``surgery/streaming.py`` does the same for a checkpoint on disk, loading one layer at a time (reroute); this module
is for a parent already in memory (a carve loads it whole, GGUF parents included).

How, for any transformers decoder: one pass per chunk with every decoder layer passed through records what the
model hands each layer -- the first layer's hidden states (embeddings, plus positions for GPT-2) and each layer's
other arguments (mask, position ids, rotary tables; per layer, so sliding-window layers keep their own mask) --
and is stopped at the last layer, before the final norm and the LM head. Then each layer runs on the stored
hidden states of every chunk with its recorded arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..router.tap import RouterTap

LayerArguments = tuple[tuple[Any, ...], dict[str, Any]]


class _LastLayerReached(Exception):
    """Stops the recording pass at the last decoder layer: nothing after it is needed."""


@torch.no_grad()
def record_layer_arguments(model: nn.Module, layers: Sequence[nn.Module], input_ids: torch.Tensor
                           ) -> tuple[torch.Tensor, list[LayerArguments]]:
    """The first decoder layer's hidden-state input for ``input_ids`` and every layer's other positional and
    keyword arguments, from one pass of ``model`` (its body, no LM head) in which every layer passes its hidden
    states through unchanged. Decoder layers of transformers 5 return their hidden states as a tensor, which the
    pass-through does too."""
    body = getattr(model, "base_model", model)
    first: list[torch.Tensor] = []
    arguments: list[LayerArguments] = []

    def pass_through(position: int) -> Callable[..., torch.Tensor]:
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if not first:
                first.append(hidden)
            arguments.append((tuple(args[1:]), dict(kwargs)))
            if position == len(layers) - 1:
                raise _LastLayerReached
            return hidden

        return forward

    # an instance attribute: nn.Module.__call__ runs it; one already there (accelerate's hooks wrap forward
    # that way) is put back afterwards
    own = [vars(layer).get("forward") for layer in layers]
    for position, layer in enumerate(layers):
        layer.forward = pass_through(position)
    try:
        body(input_ids=input_ids, use_cache=False)
    except _LastLayerReached:
        pass
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward  # the class's forward again
            else:
                layer.forward = forward
    if len(arguments) != len(layers):
        raise RuntimeError(f"{type(body).__name__} called {len(arguments)} of its {len(layers)} decoder layers")
    return first[0], arguments


class _DownInputs:
    """A forward pre-hook on an FFN's output projection that copies its input -- the FFN's intermediate activation
    ``[rows, I]`` -- into one float32 buffer of every calibration token, chunk after chunk (no concatenation: the
    buffer is the only copy)."""

    def __init__(self, rows: int):
        self.rows, self.filled, self.buffer = rows, 0, None

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        chunk = args[0].reshape(-1, args[0].shape[-1])
        if self.buffer is None:
            self.buffer = torch.empty(self.rows, chunk.shape[1], dtype=torch.float32)
        self.buffer[self.filled : self.filled + chunk.shape[0]].copy_(chunk)
        self.filled += chunk.shape[0]

    def result(self) -> torch.Tensor | None:
        return self.buffer if self.buffer is not None and self.filled == self.rows else None


@torch.no_grad()
def layerwise_ffn_inputs(model: nn.Module, layers: Sequence[nn.Module], batches: torch.Tensor, *,
                         on_layer: Callable[..., None], batch_size: int = 8,
                         on_progress: Callable[[int], None] | None = None,
                         output_projection: Callable[[nn.Module], nn.Module] | None = None) -> None:
    """Call ``on_layer(i, ffn_input [B, T, H] float32)`` for every decoder layer in turn, over ``batches``
    ``[B, T]`` run in chunks of ``batch_size`` sequences; the last layer's FFN itself never runs. ``on_layer``
    runs before the next layer's inputs exist, so it can fit that layer and free its inputs.

    ``output_projection(layer)``: the module of a layer's FFN whose input is the FFN's intermediate activation (its
    down projection); given, ``on_layer`` also gets ``activations=`` that input ``[B * T, I]`` float32, captured
    from the forward that runs anyway to make the next layer's inputs (``None`` for the last layer, whose FFN never
    runs): a carve needs exactly these, and computing them again cost a seventh of its time (docs/ARCHITECTURE.md,
    "Time of a carve")."""
    chunks = [batches[start : start + batch_size] for start in range(0, batches.shape[0], batch_size)]
    hidden: list[torch.Tensor] = []
    arguments: list[list[LayerArguments]] = []
    for chunk in chunks:
        first, recorded = record_layer_arguments(model, layers, chunk)
        hidden.append(first)
        arguments.append(recorded)
    for i, layer in enumerate(layers):
        captured: list[torch.Tensor] = []
        down = _DownInputs(batches.numel()) if output_projection is not None else None
        hook = output_projection(layer).register_forward_pre_hook(down) if down is not None else None
        try:
            with RouterTap([layer.mlp], inputs=True, outputs=False, stop_after_last=i == len(layers) - 1) as tap:
                for b, chunk_hidden in enumerate(hidden):
                    args, kwargs = arguments[b][i]
                    out = tap.run(lambda: layer(chunk_hidden, *args, **kwargs))
                    captured.append(tap.take()[0]["inputs"].float())
                    if out is not None:
                        hidden[b] = out[0] if isinstance(out, tuple) else out
        finally:
            if hook is not None:
                hook.remove()
        inputs = torch.cat(captured)
        captured.clear()  # the chunks are in ``inputs`` now: do not hold the layer's inputs twice while it is fitted
        if down is None:
            on_layer(i, inputs)
        else:
            on_layer(i, inputs, activations=down.result())
            down = None
        del inputs
        if on_progress is not None:
            on_progress(i)
