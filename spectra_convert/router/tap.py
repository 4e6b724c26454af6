"""``RouterTap``: what the modules where routing happens see and choose in a forward pass, read through hooks.

One helper for every tool that needs router inputs or routing decisions from a running model: upcycle and
reroute capture each layer's router input to fit the new routers, fine-tuning and study variants re-calibrate
biases on the inputs of trained routers, validate reads every router's choices (and a parent MoE's gates'
choices, and the inputs the baselines route). The tapped modules are SPECTRA routers, a parent MoE's gates, or
a dense parent's FFNs — whose input is exactly what the router that replaces them will see.

Routers receive flattened hidden states ``[N, H]``; their ``(batch, time)`` shape is asked of the router
(``SpectraRouter.input_shape``), as the runtime itself does (docs/ARCHITECTURE.md, "The router contract").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")


class RouterInputsCaptured(Exception):
    """Raised by a tap once the last module's input is recorded (``stop_after_last``): nothing after the last
    router's input is needed to fit routers (its experts, the final norm, the LM head), so the forward stops."""


def _grid(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` as ``[B, T, H]``: a router is asked its batch shape; a module without ``input_shape`` (a
    parent's gate, a router of an older runtime) gets one sequence of all its tokens."""
    if hidden.dim() == 3:
        return hidden
    input_shape = getattr(module, "input_shape", None)
    batch, steps = input_shape(hidden) if input_shape is not None else (1, hidden.shape[0])
    return hidden.reshape(batch, steps, hidden.shape[-1])


def router_scores(router: nn.Module, output: Any) -> torch.Tensor:
    """Cosine scores ``S / tau`` of this call, ``[N, E]`` (recorded in ``context.records`` when the model runs
    with ``output_router_logits``); else the selection logits ``-C/tau``, the router's first output."""
    records = getattr(getattr(router, "context", None), "records", None)
    if records:
        last = records[-1]
        if last.get("layer") == getattr(router, "layer_idx", None) and "scores" in last:
            return last["scores"].float() / float(getattr(router, "temperature", 1.0))
    return output[0].float()


def gate_reader(top_k: int) -> Callable[[nn.Module, Any], torch.Tensor]:
    """Selected experts ``[N, k]`` of a parent MoE's own gate: its index output, or top-k of its logits."""

    def read(module: nn.Module, output: Any) -> torch.Tensor:
        if isinstance(output, tuple):
            last = output[-1]
            if isinstance(last, torch.Tensor) and not last.is_floating_point():
                return last.reshape(-1, last.shape[-1])
            output = output[0]
        return torch.topk(output.reshape(-1, output.shape[-1]).float(), top_k, dim=-1).indices

    return read


class RouterTap:
    """Hooks on ``modules`` that record, for each forward, what each one saw and chose; ``take`` hands it over.

    ``inputs``: each module's input hidden states (a view, in the model's dtype). ``outputs``: the selected
    experts and the scores (``router_scores``) of a SPECTRA router, or what ``reader(module, output)`` reads
    from another kind of router. ``stop_after_last``: once the last module's input is recorded the forward is
    stopped (``RouterInputsCaptured``, which ``run`` absorbs). Use it as a context manager: the hooks go on at
    entry and come off at exit, also on an error.
    """

    def __init__(self, modules: Sequence[nn.Module], *, inputs: bool = False, outputs: bool = True,
                 reader: Callable[[nn.Module, Any], torch.Tensor] | None = None, stop_after_last: bool = False):
        self.modules = list(modules)
        self.inputs, self.outputs, self.reader, self.stop_after_last = inputs, outputs, reader, stop_after_last
        self._handles: list[Any] = []
        self._calls: dict[int, dict[str, torch.Tensor]] = {}

    def __enter__(self) -> RouterTap:
        for position, module in enumerate(self.modules):
            if self.inputs or self.stop_after_last:
                self._handles.append(module.register_forward_pre_hook(self._before(position)))
            if self.outputs:
                self._handles.append(module.register_forward_hook(self._after(position)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _before(self, position: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self.inputs:
                self._calls.setdefault(position, {})["inputs"] = _grid(module, args[0].detach())
            if self.stop_after_last and position == len(self.modules) - 1:
                raise RouterInputsCaptured

        return hook

    def _after(self, position: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            entry = self._calls.setdefault(position, {})
            if self.reader is not None:
                entry["selected"] = self.reader(module, output)
            else:
                entry["selected"] = output[2]
                entry["scores"] = router_scores(module, output)

        return hook

    def run(self, forward: Callable[[], T]) -> T | None:
        """``forward()``'s result, or ``None`` when the tap stopped it after the last module's input."""
        try:
            return forward()
        except RouterInputsCaptured:
            return None

    def take(self, mask: torch.Tensor | None = None, *, partial: bool = False) -> list[dict[str, torch.Tensor]]:
        """This forward's records, one dict per module: ``inputs`` ``[B, T, H]``, ``selected`` ``[N, k]``,
        ``scores`` ``[N, E]``. With ``mask [B, T]`` every record is flattened row-major to the real tokens.
        A module that did not run is an error, or an empty dict with ``partial`` (PEFT's frozen originals)."""
        out = []
        for position in range(len(self.modules)):
            entry = self._calls.get(position)
            if entry is None and partial:
                entry = {}
            elif entry is None:
                raise RuntimeError(f"tapped module {position} did not run in this forward pass")
            if mask is not None:
                flat = mask.reshape(-1).bool()
                entry = {k: v.reshape(flat.shape[0], -1)[flat.to(v.device)] for k, v in entry.items()}
            out.append(entry)
        self._calls.clear()
        return out


def capture_inputs(modules: Sequence[nn.Module], forwards: Iterable[Callable[[], Any]], *,
                   stop_after_last: bool = True) -> list[torch.Tensor]:
    """Each module's input ``[B, T, H]`` (float32) over all ``forwards``, concatenated along B. By default every
    forward stops at the last module's input (``RouterTap(stop_after_last=True)``)."""
    parts: list[list[torch.Tensor]] = [[] for _ in modules]
    with RouterTap(modules, inputs=True, outputs=False, stop_after_last=stop_after_last) as tap:
        for forward in forwards:
            tap.run(forward)
            for part, entry in zip(parts, tap.take()):
                part.append(entry["inputs"].float())
    return [torch.cat(part) for part in parts]
