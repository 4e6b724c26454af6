"""SPECTRA mixture-of-experts causal LM — the runtime shipped inside every converted model folder.

Read top to bottom:

1. ``sinkhorn``            — log-domain Sinkhorn with k slots per token and equal expert capacity.
2. ``RoutingContext``      — what routers need but an FFN call does not pass: batch shape, padding, cache.
3. ``SpectraRouter``       — GRU state -> orthogonal expression projector -> cosine scores -> OSR repulsion
                              -> top-k on cost + dual bias -> softmax weights over the selected experts.
4. ``SpectraExperts``      — experts as fused 3-D tensors; tokens dispatched by sorting slots per expert.
5. ``SpectraMoeBlock``     — router + experts (+ optional shared expert): the FFN of a dense parent.
6. ``SpectraCache``        — a DynamicCache whose router GRU states are reordered with the KV cache.
7. ``SpectraForCausalLM``  — the parent causal LM (llama, gpt2, mixtral, ...) with SPECTRA routing inside.

Why routing is per-token at inference (docs/ARCHITECTURE.md, "Routing"): Sinkhorn across a batch makes a token's experts depend on
the other tokens in the batch (including its own future), so outputs would change with batch composition and
one-token decoding would be impossible. Sinkhorn therefore only *sets* a per-layer bias ``dual_bias`` (its
column potentials, EMA-averaged in training and corrected on hard top-k loads at calibration); selection is
``topk(-C/tau + dual_bias)`` for every token on its own. ``balance_mode="in_batch"`` keeps the paper-literal
variant for ablations.

This file imports only torch and transformers (never spectra_convert), so the folder it ships in loads with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` anywhere; numba, when installed, only
makes the router's GRU loops faster.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .configuration_spectra import MOE_PARENTS, SpectraConfig

try:  # optional: compiles the GRU's sequential loops (see "Compiled recurrences" below); the file loads without it
    import numba
    import numpy as np
except ImportError:  # pragma: no cover - exercised by folders loaded where numba is not installed
    numba = None

# --------------------------------------------------------------------------------------------------------------
# 1. Sinkhorn
# --------------------------------------------------------------------------------------------------------------


def sinkhorn(logits: torch.Tensor, top_k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced transport plan for routing ``N`` tokens to ``E`` experts with ``top_k`` slots per token.

    Solves, in the log domain and for a fixed number of iterations, for ``P = exp(logits + f + g)`` with row
    sums ``top_k`` (every token fills all of its k slots) and column sums ``N * top_k / E`` (equal capacity).
    Balancing all k slots matters: balancing one slot per token leaves top-2 loads at CV 0.13-0.49.

    Returns ``(plan [N, E], column_potentials g [E])``; ``g`` is centred (its gauge is free) and is what the
    router's dual bias averages: ranking ``logits + g`` per row is exactly how the plan ranks experts.
    """
    logits = logits.float()
    n_tokens, n_experts = logits.shape
    log_row = math.log(top_k)
    log_col = math.log(n_tokens * top_k / n_experts)
    f = logits.new_zeros(n_tokens)
    g = logits.new_zeros(n_experts)
    for _ in range(iters):
        f = log_row - torch.logsumexp(logits + g[None, :], dim=1)
        g = log_col - torch.logsumexp(logits + f[:, None], dim=0)
    plan = torch.exp(logits + f[:, None] + g[None, :])
    return plan, g - g.mean()


# --------------------------------------------------------------------------------------------------------------
# 2. Routing context
# --------------------------------------------------------------------------------------------------------------


@dataclass
class RoutingContext:
    """Per-forward information shared by all routers of one model.

    An FFN receives only hidden states (often already flattened to ``[N, H]``); the router also needs the
    ``(batch, time)`` shape to run its GRU, which tokens are padding, and the cache that carries GRU states
    between decoding steps. ``SpectraForCausalLM.forward`` fills this before calling the parent model.
    """

    batch_shape: tuple[int, int] | None = None
    token_mask: torch.Tensor | None = None  # [B, T] bool, True for real tokens
    cache: Any = None  # transformers Cache whose ``spectra_router_states`` dict holds per-layer GRU states
    records: list[dict[str, torch.Tensor]] | None = None  # filled by routers when not None

    def reset(self) -> None:
        self.batch_shape, self.token_mask, self.cache, self.records = None, None, None, None


def router_states_of(cache: Any) -> dict[int, torch.Tensor]:
    """The dict of per-layer GRU states stored on a transformers cache object (created on first use)."""
    states = getattr(cache, "spectra_router_states", None)
    if states is None:
        states = {}
        cache.spectra_router_states = states
    return states


@contextmanager
def single_cpu_thread(tensor: torch.Tensor) -> Iterator[None]:
    """Run tiny or sequential CPU work on one thread: with more, each op pays thread sync for no gain."""
    threads = torch.get_num_threads()
    switch = tensor.device.type == "cpu" and threads > 1
    if switch:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if switch:
            torch.set_num_threads(threads)


SEQUENCE_CHUNK = 16  # real tokens per commit of a sequence's running hard loads (SpectraRouter.sequence_select)
#: Fewest tokens a row for which ``sequence_select`` calls the compiled loop (``_sequence_select_loop``): below 4
#: chunks the torch loop costs less than the loop's compile (~1.5 s once per process and model folder).
COMPILED_SEQUENCE_MIN_STEPS = 4 * SEQUENCE_CHUNK

# -- Compiled recurrences ---------------------------------------------------------------------------------------
# docs/ARCHITECTURE.md, "Runtime speed": a GRU step is a [B, d] x [d, 3d] product and 3d gate functions, tiny
# work that ATen's CPU loop spends ~10 us of op dispatch on (12 ops a step; 5 ms per layer for a 512-token
# sequence at router_dim 32, as long as the parent's whole FFN). The two loops below are the only sequential
# parts of the router; numba compiles them to plain machine code (12x faster than ATen's loop at router_dim 32,
# 2.8x at 128, for one 512-token row). Rows are processed one at a time by the same code, so a row's recurrence
# never depends on the other rows of its batch. A decoding step runs neither loop: the compiled decoding step
# below (``_route_row``; ATen's one-call GRU cell where that does not apply, SpectraRouter._run_gru). Values follow PyTorch's GRU equations, not its bits (another summation order,
# gates in float64): within 1e-5 of ``nn.GRU`` in float32 over 200 steps (tests/test_runtime.py). The input gates
# stay one GEMM, as in ATen's loop. ``COMPILED_RECURRENCE = False`` (or no numba, bfloat16 or GPU tensors,
# CPU autocast) runs ATen's loop instead.

COMPILED_RECURRENCE = True


def _inlined(fn: Callable[..., Any]) -> Callable[..., Any]:
    """With numba: ``fn`` compiled into the compiled loops that call it (lazily, when they compile). Without: ``fn``."""
    return numba.njit(inline="always", error_model="numpy")(fn) if numba is not None else fn


def _njit(fn: Callable[..., Any], signatures: str | list[str], **options: Any) -> Callable[..., None] | None:
    """``fn`` compiled by numba for ``signatures`` (eagerly: a failure shows here, not at the first call), cached
    on disk where numba can write and in memory where it cannot, or ``None`` when numba cannot compile it here
    (the caller then runs torch's ops). ``error_model`` numpy: no zero-division branch in the loops (it stopped
    them vectorising)."""
    for cache in (True, False):
        try:
            return numba.njit(signatures, nogil=True, cache=cache, error_model="numpy", **options)(fn)
        except Exception:  # noqa: BLE001 - any failure means: the torch path
            continue
    return None


@_inlined
def _sigmoid64(x: float) -> float:
    """``1 / (1 + exp(-x))`` in float64 from multiply-adds only, so that the loops calling it vectorise (a libm
    ``exp`` call per gate would not: 5 ns a gate, 384 gates a step at router_dim 128). ``exp(-x) = (e^y)^32``
    with ``y = -x / 32``: e^y by its Taylor series to y^12, squared five times; x clamped to [-30, 30] (where
    sigmoid is 1e-13 from 0 or 1). Within 1e-12 of the exact function, 1e-9 relative (tests/test_runtime.py)."""
    y = -min(max(x, -30.0), 30.0) * 0.03125
    p = 1.0 + y * (1.0 + y * (1 / 2 + y * (1 / 6 + y * (1 / 24 + y * (1 / 120 + y * (1 / 720 + y * (
        1 / 5040 + y * (1 / 40320 + y * (1 / 362880 + y * (1 / 3628800 + y * (1 / 39916800 + y / 479001600)))))))))))
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    return 1.0 / (1.0 + p)


@_inlined
def _gru_update(h_prev: float, reset: float, update: float, input_n: float, hidden_n: float) -> float:
    """A GRU unit's new state from its previous one, its reset and update gates and the input and hidden parts of
    its candidate: ``n = tanh(i_n + r * h_n)`` as ``2 sigmoid(2a) - 1``, ``h = (h_prev - n) * z + n``."""
    n = 2.0 * _sigmoid64(2.0 * (input_n + reset * hidden_n)) - 1.0
    return (h_prev - n) * update + n


def _gru_forward_loop(gates_in, h0, w_hh_t, b_hh, out):  # type: ignore[no-untyped-def]  (numba-compiled)
    """``out[b, t] = h_t`` of every row from its input gates ``x W_ih^T + b_ih [B, T, 3d]`` (one GEMM, computed
    by the caller) and ``h0 [B, d]``; ``w_hh_t = W_hh^T [d, 3d]``. PyTorch's equations, gate order r, z, n:
    ``r, z = sigmoid(i_{r,z} + h_{r,z})``, ``n = tanh(i_n + r * h_n)``, ``h_t = (h_{t-1} - n) * z + n``; gates in
    float64, ``tanh(a) = 2 sigmoid(2a) - 1``."""
    batch, steps, width = gates_in.shape
    d = width // 3
    hidden_gates = np.empty(width, gates_in.dtype)
    gates = np.empty(2 * d, np.float64)  # r | z
    h = np.empty(d, gates_in.dtype)
    for b in range(batch):
        h[:] = h0[b]
        for t in range(steps):
            hidden_gates[:] = b_hh
            for i in range(d):  # h W_hh^T one input unit at a time: the inner loop vectorises over 3d outputs
                hi = h[i]
                for j in range(width):
                    hidden_gates[j] += hi * w_hh_t[i, j]
            for j in range(2 * d):
                gates[j] = _sigmoid64(float(gates_in[b, t, j] + hidden_gates[j]))
            for j in range(d):
                h[j] = _gru_update(h[j], gates[j], gates[d + j], gates_in[b, t, 2 * d + j], hidden_gates[2 * d + j])
                out[b, t, j] = h[j]


def _gru_backward_loop(grads, upstream, hidden_factor, keep, w_hh):  # type: ignore[no-untyped-def]  (numba-compiled)
    """``grads[b, t] = dL/dh_t`` through time (``SequenceGRU.backward`` names the factors): ``g_T = upstream_T``,
    ``g_{t-1} = upstream_{t-1} + g_t * z_t + (g_t * hidden_factor_t) W_hh``, ``hidden_factor [B, T, 3d]`` in W_hh's
    row order (r, z, n), ``keep = z [B, T, d]``."""
    batch, steps, d = upstream.shape
    width = 3 * d
    gate_grads = np.empty(width, upstream.dtype)
    for b in range(batch):
        grads[b, steps - 1] = upstream[b, steps - 1]
        for t in range(steps - 1, 0, -1):
            for j in range(width):
                gate_grads[j] = grads[b, t, j % d] * hidden_factor[b, t, j]
            for i in range(d):
                grads[b, t - 1, i] = upstream[b, t - 1, i] + grads[b, t, i] * keep[b, t, i]
            for j in range(width):  # one W_hh row at a time: the inner loop vectorises over d
                g = gate_grads[j]
                for i in range(d):
                    grads[b, t - 1, i] += g * w_hh[j, i]


@_inlined
def _select_top_k(ranked, taken, selected_out):  # type: ignore[no-untyped-def]
    """``selected_out[:k]`` = the top-k of ``ranked [E]`` in descending order, ties to the lower index (``taken``
    [E]: scratch, True for the chosen)."""
    experts = ranked.shape[0]
    for e in range(experts):
        taken[e] = False
    for slot in range(selected_out.shape[0]):
        best = -1
        for e in range(experts):
            if not taken[e] and (best < 0 or ranked[e] > ranked[best]):
                best = e
        taken[best] = True
        selected_out[slot] = best


@_inlined
def _route_row(gates_in, projected, h0, w_hh, b_hh, proj_r, mu, repulsion, strength, temperature, bias, balance,  # type: ignore[no-untyped-def]
               chunk, totals, hidden_out, state_out, logits_out, selected_out, weights_out):
    """One token's decoding step of a router from its input gates ``x W_ih^T + b_ih [3d]`` and ``P_h x [d]``: the
    GRU cell from ``h0`` (the compiled recurrence's equations, gates in float64), ``z = normalize(projected +
    P_r h)``, cosine scores against the unit expert vectors ``mu [E, d]``, the logits ``(S - lambda |S| @ R) /
    tau`` (``repulsion`` is ``R``, ``[0, 0]`` when off; ``strength`` is lambda), top-k of ``logits + bias`` (plus
    the per-sequence correction from ``totals [2E + 1]`` when ``balance > 0``, ``SpectraRouter._decode_select``'s
    rule; ties to the lower index), the softmax of the chosen scores / tau, and the new router state ``[GRU
    state | committed | pending | tokens]``. Sums in float64; each value is rounded to its output's dtype where
    the torch path rounds it (the state before ``z``, the logits before ranking)."""
    d = h0.shape[0]
    width = 3 * d
    experts = mu.shape[0]
    k = selected_out.shape[0]
    hidden = np.empty(width, np.float64)
    h = np.empty(d, np.float64)
    z = np.empty(d, np.float64)
    scores = np.empty(experts, np.float64)
    ranked = np.empty(experts, np.float64)
    taken = np.zeros(experts, np.bool_)
    for j in range(width):
        acc = 0.0
        for i in range(d):
            acc += w_hh[j, i] * h0[i]
        hidden[j] = acc + b_hh[j]
    for j in range(d):
        reset = _sigmoid64(gates_in[j] + hidden[j])
        update = _sigmoid64(gates_in[d + j] + hidden[d + j])
        hidden_out[j] = _gru_update(h0[j], reset, update, gates_in[2 * d + j], hidden[2 * d + j])
        h[j] = hidden_out[j]
        state_out[j] = hidden_out[j]
    norm = 0.0
    for i in range(d):
        acc = 0.0
        for j in range(d):
            acc += proj_r[i, j] * h[j]
        z[i] = projected[i] + acc
        norm += z[i] * z[i]
    norm = max(math.sqrt(norm), 1e-12)
    for e in range(experts):
        acc = 0.0
        for i in range(d):
            acc += mu[e, i] * z[i]
        scores[e] = acc / norm
    for e in range(experts):
        term = 0.0
        for f in range(repulsion.shape[0]):
            term += abs(scores[f]) * repulsion[f, e]
        logits_out[e] = (scores[e] - strength * term) / temperature
        ranked[e] = logits_out[e] + bias[e]
    seen = totals[2 * experts]
    before = seen - seen % chunk
    if balance > 0 and before > 0:
        for e in range(experts):
            ranked[e] += -balance * experts * (totals[e] / max(before * k, 1.0) - 1.0 / experts)
    _select_top_k(ranked, taken, selected_out)
    top = scores[selected_out[0]] / temperature
    total = 0.0
    for slot in range(k):
        total += math.exp(scores[selected_out[slot]] / temperature - top)
    for slot in range(k):
        weights_out[slot] = math.exp(scores[selected_out[slot]] / temperature - top) / total
    for e in range(2 * experts + 1):
        state_out[d + e] = 0.0
    if balance > 0:
        finished = (seen + 1) % chunk == 0
        for e in range(experts):
            count = totals[experts + e] + (1.0 if taken[e] else 0.0)
            state_out[d + e] = totals[e] + (count if finished else 0.0)
            state_out[d + experts + e] = 0.0 if finished else count
        state_out[d + 2 * experts] = seen + 1


def _route_step_loop(gates_in, projected, h0, w_hh, b_hh, proj_r, mu, repulsion, strength, temperature,  # type: ignore[no-untyped-def]
                     bias, balance, chunk, totals, hidden_out, state_out, logits_out, selected_out, weights_out):
    """``_route_row`` for each row of a ``[B, ...]`` decoding step (``SpectraRouter._compiled_step`` computes the
    two input GEMMs ``gates_in [B, 3d]`` and ``projected [B, d]`` on the caller's threads)."""
    for b in range(gates_in.shape[0]):
        _route_row(gates_in[b], projected[b], h0[b], w_hh, b_hh, proj_r, mu, repulsion, strength, temperature, bias,
                   balance, chunk, totals[b], hidden_out[b], state_out[b], logits_out[b], selected_out[b], weights_out[b])


def _sequence_select_loop(scores, real, state0, balance, chunk, selected, correction, state_out):  # type: ignore[no-untyped-def]  (numba-compiled)
    """``SpectraRouter.sequence_select``'s chunk loop one token at a time, for ``scores = logits + bias [B, T, E]``
    (float32), ``real [B, T]`` (False: a pad, never counted, corrected as the next real token) and the state
    ``[B, 2E + 1]`` it resumes from: a token's correction ``-beta * E * (c / (n * k) - 1/E)`` reads the counts ``c``
    committed before the last multiple of ``chunk`` real tokens below it, in float32 in the torch path's order
    (the same bits: tests/test_runtime.py); top-k of ``scores + correction``, ties to the lower index. Writes
    ``selected [B, T, k]``, ``correction [B, T, E]`` and the state after the last token."""
    batch, steps, experts = scores.shape
    k = selected.shape[2]
    scale = np.float32(-balance * experts)
    uniform = np.float32(1.0 / experts)
    committed = np.empty(experts, np.float32)
    pending = np.empty(experts, np.float32)
    fix = np.empty(experts, np.float32)
    ranked = np.empty(experts, np.float32)
    taken = np.empty(experts, np.bool_)
    for b in range(batch):
        for e in range(experts):
            committed[e] = state0[b, e]
            pending[e] = state0[b, experts + e]
        seen = int(round(state0[b, 2 * experts]))
        for t in range(steps):
            before = seen - seen % chunk
            denom = np.float32(max(before * k, 1))
            for e in range(experts):
                fix[e] = scale * (committed[e] / denom - uniform) if before > 0 else np.float32(0.0)
                ranked[e] = scores[b, t, e] + fix[e]
                correction[b, t, e] = fix[e]
            _select_top_k(ranked, taken, selected[b, t])
            if real[b, t]:
                for slot in range(k):
                    pending[selected[b, t, slot]] += np.float32(1.0)
                seen += 1
                if seen % chunk == 0:
                    for e in range(experts):
                        committed[e] += pending[e]
                        pending[e] = np.float32(0.0)
        for e in range(experts):
            state_out[b, e] = committed[e]
            state_out[b, experts + e] = pending[e]
        state_out[b, 2 * experts] = np.float32(seen)


_compiled_sequence: Callable[..., None] | None | bool = False  # False: not tried yet


def compiled_sequence_select(scores: torch.Tensor) -> Callable[..., None] | None:
    """``_sequence_select_loop`` compiled once per process when it applies to ``scores`` (CPU, float32, the switch
    and numba there), else ``None`` (the caller runs the torch chunk loop)."""
    global _compiled_sequence
    if not COMPILED_RECURRENCE or numba is None or scores.dtype != torch.float32 or not scores.is_cpu:
        return None
    if _compiled_sequence is False:
        signature = ("void(float32[:, :, ::1], boolean[:, ::1], float32[:, ::1], float64, int64, int64[:, :, ::1], "
                     "float32[:, :, ::1], float32[:, ::1])")
        _compiled_sequence = _njit(_sequence_select_loop, signature)
    return _compiled_sequence if callable(_compiled_sequence) else None


@_inlined
def _silu64(x: float) -> float:
    """``x * sigmoid(x)`` in float64."""
    return x * _sigmoid64(x)


def _gated_block_step(x, w_ih, b_ih, w_hh, b_hh, projector, mu, repulsion, strength, temperature, bias, balance,  # type: ignore[no-untyped-def]
                      chunk, state_in, gate_up, down, gate_up_lhs, gate_up_rhs, gate_up_scale, down_lhs, down_rhs,
                      down_scale, scale, shared_gate_up, shared_down, est_in, est_out, est_bias, share, scratch,
                      selected_out, state_out, out):
    """A gated (SwiGLU) MoE block's whole decoding step for one token ``x [H]``, on the cores numba's threading layer
    gives it (OpenMP: the pool torch's kernels use). Three parallel passes over the weights, each row read once:
    (1) everything that reads ``x`` -- the router's input gates and ``P_h x``, the shared expert's gate and up
    rows, the estimate's inner rank; then the router step (``_route_row``) on one thread; (2) the selected
    experts' gate and up rows, times their coefficient (``scale[e]`` for a carve's sum, else the softmax
    weight); (3) per output unit, the down rows of the selected experts, the shared expert and the estimate.
    An unmerged LoRA adapter on the expert tensors comes as factors ``W_e + s lhs_e @ rhs_e`` (``lhs [E, out, r]``,
    ``rhs [E, r, in]``, rank 0 when absent), applied to the selected experts' rows as ``peft_expert_lora`` does.
    ``state_in``: the router's cached state row ``[GRU state (d) | totals (2E + 1)]`` (zeros before the first
    token); ``scratch``: at least ``d + E + k`` floats for the new GRU state, the logits and the weights.
    ``SpectraMoeBlock._compiled_step`` says when it runs and why (docs/ARCHITECTURE.md, "Runtime speed")."""
    hidden = x.shape[0]
    d = w_hh.shape[1]
    experts = mu.shape[0]
    width = 3 * d
    inter = gate_up.shape[1] // 2
    shared_inter = shared_gate_up.shape[0] // 2
    rank = est_in.shape[0]
    k = selected_out.shape[0]
    firsts = width + d + shared_inter + rank
    reads = np.empty(firsts, np.float32)  # input gates | P_h x | shared expert's activations | estimate's inner rank
    for row in numba.prange(firsts):
        if row < width + d:
            acc = np.float32(0.0)
            if row < width:
                for c in range(hidden):
                    acc += w_ih[row, c] * x[c]
                reads[row] = acc + b_ih[row]
            else:
                for c in range(hidden):
                    acc += projector[row - width, c] * x[c]
                reads[row] = acc
        elif row < width + d + shared_inter:
            i = row - width - d
            g = np.float32(0.0)
            u = np.float32(0.0)
            for c in range(hidden):
                g += shared_gate_up[i, c] * x[c]
                u += shared_gate_up[shared_inter + i, c] * x[c]
            reads[row] = np.float32(_silu64(g)) * u
        else:
            acc = np.float32(0.0)
            for c in range(hidden):
                acc += est_in[row - width - d - shared_inter, c] * x[c]
            reads[row] = acc
    _route_row(reads[:width], reads[width:width + d], state_in[:d], w_hh, b_hh, projector[:, hidden:], mu, repulsion,
               strength, temperature, bias, balance, chunk, state_in[d:], scratch[:d], state_out,
               scratch[d:d + experts], selected_out, scratch[d + experts:d + experts + k])
    coefficient = np.empty(k, np.float32)
    for slot in range(k):
        coefficient[slot] = scale[selected_out[slot]] if scale.shape[0] > 0 else scratch[d + experts + slot]
    first_rank, down_rank = gate_up_rhs.shape[1], down_rhs.shape[1]
    inner = np.zeros((k, first_rank), np.float32)  # rhs_e @ x of each selected expert's gate/up adapter
    for slot in range(k):
        for j in range(first_rank):
            acc = np.float32(0.0)
            for c in range(hidden):
                acc += gate_up_rhs[selected_out[slot], j, c] * x[c]
            inner[slot, j] = acc
    act = np.empty(k * inter, np.float32)
    for row in numba.prange(k * inter):
        slot = row // inter
        i = row - slot * inter
        e = selected_out[slot]
        g = np.float32(0.0)
        u = np.float32(0.0)
        for c in range(hidden):
            g += gate_up[e, i, c] * x[c]
            u += gate_up[e, inter + i, c] * x[c]
        if first_rank > 0:
            g_low = np.float32(0.0)
            u_low = np.float32(0.0)
            for j in range(first_rank):
                g_low += gate_up_lhs[e, i, j] * inner[slot, j]
                u_low += gate_up_lhs[e, inter + i, j] * inner[slot, j]
            g += np.float32(gate_up_scale) * g_low
            u += np.float32(gate_up_scale) * u_low
        act[row] = np.float32(_silu64(g)) * u * coefficient[slot]
    inner_down = np.zeros((k, down_rank), np.float32)  # rhs_e @ (weighted activations) of the down adapter
    for slot in range(k):
        for j in range(down_rank):
            acc = np.float32(0.0)
            for i in range(inter):
                acc += down_rhs[selected_out[slot], j, i] * act[slot * inter + i]
            inner_down[slot, j] = acc
    shared_at = width + d
    estimate_at = shared_at + shared_inter
    for unit in numba.prange(hidden):
        total = np.float32(0.0)
        for slot in range(k):
            e = selected_out[slot]
            for i in range(inter):
                total += down[e, unit, i] * act[slot * inter + i]
            if down_rank > 0:
                low = np.float32(0.0)
                for j in range(down_rank):
                    low += down_lhs[e, unit, j] * inner_down[slot, j]
                total += np.float32(down_scale) * low
        acc = np.float32(0.0)
        for i in range(shared_inter):
            acc += shared_down[unit, i] * reads[shared_at + i]
        total += acc
        if rank > 0:
            acc = np.float32(0.0)
            for j in range(rank):
                acc += est_out[unit, j] * reads[estimate_at + j]
            total += (acc + est_bias[unit]) * np.float32(share)
        out[unit] = total


_compiled_block: Callable[..., None] | None | bool = False  # False: not tried yet
_block_pool_started = False  # numba's thread pool has run the block kernel once (``torch_threads_kept`` says why)
SILU_TYPES = (nn.SiLU, type(ACT2FN["silu"]))  # the activations ``_gated_block_step`` computes (x * sigmoid(x))


class BlockStepTensors(NamedTuple):
    """A block's tensors for ``_gated_block_step``, named, in the kernel's argument order (``None`` where a part is
    absent: no repulsion, no unmerged LoRA, a softmax combine without expert scales, no shared expert, no
    estimate). ``SpectraMoeBlock._compiled_parts`` fills it from the modules; ``_compiled_step`` turns it into
    numpy views, an empty array for each absent part (``absent_shapes``)."""

    w_ih: torch.Tensor  # router GRU input weights [3d, H] and bias [3d]
    b_ih: torch.Tensor
    w_hh: torch.Tensor  # router GRU recurrent weights [3d, d] and bias [3d]
    b_hh: torch.Tensor
    projector: torch.Tensor  # [d, H + d]
    mu: torch.Tensor  # unit expert vectors [E, d]
    repulsion: torch.Tensor | None  # [E, E]
    dual_bias: torch.Tensor  # [E]
    gate_up: torch.Tensor  # fused experts [E, 2I, H] and [E, H, I]
    down: torch.Tensor
    gate_up_lhs: torch.Tensor | None  # an unmerged LoRA's factors: lhs [E, out, r], rhs [E, r, in]
    gate_up_rhs: torch.Tensor | None
    down_lhs: torch.Tensor | None
    down_rhs: torch.Tensor | None
    expert_scale: torch.Tensor | None  # [E]: a carve's sum combine (absent: softmax weights)
    shared_gate_up: torch.Tensor | None  # the shared expert, a stack of one: [1, 2S, H] and [1, H, S]
    shared_down: torch.Tensor | None
    estimate_in: torch.Tensor | None  # the skipped-experts estimate: [R, H], [H, R], [H]
    estimate_out: torch.Tensor | None
    estimate_bias: torch.Tensor | None

    @staticmethod
    def absent_shapes(hidden: int, experts: int, inter: int) -> dict[str, tuple[int, ...]]:
        """Empty stand-ins of the right rank for absent parts (rank 0 or width 0: the kernel's loops skip them)."""
        return {"repulsion": (0, 0), "gate_up_lhs": (experts, 2 * inter, 0), "gate_up_rhs": (experts, 0, hidden),
                "down_lhs": (experts, hidden, 0), "down_rhs": (experts, 0, inter), "expert_scale": (0,),
                "shared_gate_up": (1, 0, hidden), "shared_down": (1, hidden, 0), "estimate_in": (0, hidden),
                "estimate_out": (hidden, 0), "estimate_bias": (hidden,)}


#: LoRA factor fields of ``BlockStepTensors``: views of PEFT's weights, any non-negative strides (the rest must be
#: contiguous).
LORA_FACTOR_FIELDS = ("gate_up_lhs", "gate_up_rhs", "down_lhs", "down_rhs")


@dataclass
class PreparedBlockStep:
    """What a block's decoding step hands the kernel besides the token -- its router, the numpy views of its
    tensors, the scratch arrays, the LoRA / estimate scales -- and a stamp of what they were read from, so that the
    next step reuses them after one comparison (``still_fits``) instead of reading every part again.

    Reused only for plain parts (the block's own router, experts, shared expert and estimate: no PEFT wrapper,
    whose active adapter can change with no module or tensor changing); a step with a wrapper prepares afresh.
    The stamp sees what would make the views wrong: a hook registered anywhere (torch numbers every hook handle:
    ``RemovableHandle.next_id``), a part, its GRU or activation replaced, a parameter or buffer replaced or moved
    to another dtype or device (the identities in the modules' dicts, the tensors' storage addresses), the
    router's ``top_k`` / ``repulsion`` / ``temperature`` / ``sequence_balance`` / GRU / projector settings or the
    estimate's fitted top-k changed, the expert vectors' values changed (the unit vectors and repulsion weights
    derive from them, as ``SpectraRouter.expert_geometry`` says). In-place edits of any other tensor show through
    the views. Every part of the stamp is one C-level call: per decoded token a layer's Python work runs with cold
    caches (the weights just streamed evict it), where each Python-level step costs several times its warm time
    (docs/ARCHITECTURE.md, "Runtime speed")."""

    gate: SpectraRouter
    before_state: tuple[Any, ...]  # the kernel's arguments between the token and the router state ...
    after_state: tuple[Any, ...]  # ... and between the router state and the outputs
    no_state: Any  # the router state before the first token (zeros, never written)
    state_width: int
    holders: tuple[dict[str, Any], ...] | None  # the dicts whose entries the stamp follows; None: never reused
    estimate: SkippedExpertsEstimate | None
    tensors: tuple[torch.Tensor, ...]
    vectors: Any  # a numpy view of the router's expert vectors (the stamp holds their bytes)
    stamp: tuple[Any, ...]

    @classmethod
    def of(cls, block: nn.Module, gate: SpectraRouter, arrays: BlockStepTensors, scratch: tuple[Any, Any, Any],
           scales: tuple[float, float, float], tensors: BlockStepTensors, hook_id: int) -> PreparedBlockStep:
        """The prepared step for these parts (``hook_id``: ``RemovableHandle.next_id`` before they were read)."""
        modules = block._modules
        experts, shared, estimate = (modules.get(name) for name in ("experts", "shared_expert", "skipped_estimate"))
        plain = (modules["gate"] is gate and type(experts) is SpectraExperts and tensors.gate_up_lhs is None
                 and (estimate is None or type(estimate) is SkippedExpertsEstimate))
        a, (no_state, scratch, selected), (first_scale, second_scale, share) = arrays, scratch, scales
        before = (a.w_ih, a.b_ih, a.w_hh, a.b_hh, a.projector, a.mu, a.repulsion, float(gate.repulsion),
                  float(gate.temperature), a.dual_bias, float(gate.sequence_balance), float(SEQUENCE_CHUNK))
        after = (a.gate_up, a.down, a.gate_up_lhs, a.gate_up_rhs, float(first_scale), a.down_lhs, a.down_rhs,
                 float(second_scale), a.expert_scale, a.shared_gate_up, a.shared_down, a.estimate_in, a.estimate_out,
                 a.estimate_bias, share, scratch, selected)
        width = gate.router_dim + 2 * gate.num_experts + 1
        if not plain:
            return cls(gate, before, after, no_state, width, None, None, (), None, ())
        parts = [gate, gate._modules["gru"], experts] + [part for part in (shared, estimate) if part is not None]
        holders = (modules, block._parameters, gate._modules, experts._modules, gate._buffers) + tuple(
            part._parameters for part in parts) + ((shared._modules,) if shared is not None else ())
        tensors = tuple(t for holder in holders[1:] for t in holder.values() if isinstance(t, torch.Tensor))
        vectors = gate.expert_vectors.detach().numpy()
        step = cls(gate, before, after, no_state, width, holders, estimate, tensors, vectors, ())
        step.stamp = step.current_stamp(hook_id)
        return step

    def current_stamp(self, hook_id: int) -> tuple[Any, ...]:
        """The stamp now; the parts' attributes are read from the parts the step was prepared from (the dicts'
        identities say whether the block still holds them)."""
        gate, estimate = self.gate, self.estimate
        return (hook_id, gate.top_k, gate.repulsion, gate.temperature, gate.sequence_balance, gate.use_gru,
                gate.use_projector, estimate.fitted_top_k if estimate is not None else None, self.vectors.tobytes(),
                tuple(map(id, chain.from_iterable(map(dict.values, self.holders)))),
                tuple(map(torch.Tensor.data_ptr, self.tensors)))

    def still_fits(self) -> bool:
        """Whether the prepared arguments are still this block's (the class docstring lists what is compared)."""
        return self.holders is not None and self.current_stamp(RemovableHandle.next_id) == self.stamp


def compiled_block_step() -> Callable[..., None] | None:
    """``_gated_block_step`` compiled for float32 once per process (parallel, cached on disk by numba where it can
    write), or ``None`` when numba is missing, switched off or cannot compile here."""
    global _compiled_block
    if not COMPILED_RECURRENCE or numba is None:
        return None
    if _compiled_block is False:
        _compiled_block = None
        m, v, a = "float32[:, ::1]", "float32[::1]", "float32[:]"
        stack, factors = "float32[:, :, ::1]", "float32[:, :, :]"  # fused expert tensors; LoRA factors (any strides)
        signature = (f"void({v}, {m}, {v}, {m}, {v}, {m}, {m}, {m}, float64, float64, {v}, float64, float64, {a}, "
                     f"{stack}, {stack}, {factors}, {factors}, float64, {factors}, {factors}, float64, "
                     f"{v}, {m}, {m}, {m}, {m}, {v}, float64, {v}, int64[::1], {v}, {v})")
        with torch_threads_kept():
            _compiled_block = _njit(_gated_block_step, signature, parallel=True, fastmath={"reassoc", "contract"})
    return _compiled_block if callable(_compiled_block) else None


@contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Keep torch's CPU thread count across work that may start numba's thread pool. numba's OpenMP layer sets
    the process's OpenMP thread count to NUMBA_NUM_THREADS (every core) when its pool starts -- at the parallel
    kernel's compile, or its first call when it came from numba's disk cache -- and torch reads its count from
    OpenMP, so without this a process run with ``OMP_NUM_THREADS=1`` or ``torch.set_num_threads(1)`` silently
    ran every later torch op on all cores
    (measured, 2 cores with another process keeping one busy: the parent's decode 45 -> 713 ms a token in the
    same process after a SPECTRA model's first decoding step; docs/ARCHITECTURE.md, "Runtime speed")."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


_compiled_step: Callable[..., None] | None | bool = False  # False: not tried yet


def compiled_route_step(*tensors: torch.Tensor) -> Callable[..., None] | None:
    """The compiled decoding step when it applies to these tensors (the conditions of ``compiled_loops_for``),
    compiled for float32 and float64 once per process on first use (cached on disk by numba where it can
    write), else ``None``."""
    global _compiled_step
    if compiled_loops_for(*tensors) is None:
        return None
    if _compiled_step is False:
        _compiled_step = None
        signatures = [f"void({t}[:, :], {t}[:, :], {t}[:, :], {t}[:, :], {t}[:], {t}[:, :], {t}[:, :], {t}[:, :], "
                      f"float64, float64, {t}[:], float64, float64, float32[:, :], {t}[:, :], float32[:, :], {t}[:, :], "
                      f"int64[:, :], {t}[:, :])" for t in ("float32", "float64")]
        _compiled_step = _njit(_route_step_loop, signatures)
    return _compiled_step if callable(_compiled_step) else None


_compiled_loops: tuple[Callable[..., None], Callable[..., None]] | None | bool = False  # False: not tried yet


def _compile_loops() -> tuple[Callable[..., None], Callable[..., None]] | None:
    """Both loops compiled for float32 and float64 C-contiguous arrays, once per process (cached on disk by
    numba where it can write; ~1 s the first time), or ``None`` when numba is missing or cannot compile here."""
    global _compiled_loops
    if _compiled_loops is False:
        _compiled_loops = None
        if numba is not None:
            signatures = [f"void({t}[:, :, ::1], {t}[:, ::1], {t}[:, ::1], {t}[::1], {t}[:, :, ::1])"
                          for t in ("float32", "float64")]
            backward = [f"void({t}[:, :, ::1], {t}[:, :, ::1], {t}[:, :, ::1], {t}[:, :, ::1], {t}[:, ::1])"
                        for t in ("float32", "float64")]
            loops = (_njit(_gru_forward_loop, signatures, fastmath={"contract"}),
                     _njit(_gru_backward_loop, backward, fastmath={"contract"}))
            _compiled_loops = loops if None not in loops else None
    return _compiled_loops if isinstance(_compiled_loops, tuple) else None


def compiled_loops_for(*tensors: torch.Tensor) -> tuple[Callable[..., None], Callable[..., None]] | None:
    """The compiled loops when they apply to these tensors (CPU, all float32 or all float64, no CPU autocast,
    switch on)."""
    if not COMPILED_RECURRENCE or numba is None or torch.is_autocast_enabled("cpu"):
        return None
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.float64) or any(t.dtype != dtype or not t.is_cpu for t in tensors):
        return None
    return _compiled_loops if isinstance(_compiled_loops, tuple) else _compile_loops()


def _array(tensor: torch.Tensor) -> Any:
    """A C-contiguous numpy view of ``tensor``'s values (a copy only when it is not contiguous)."""
    return tensor.detach().contiguous().numpy()


def compiled_gru(x: torch.Tensor, h0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
                 b_hh: torch.Tensor, forward_loop: Callable[..., None]) -> torch.Tensor:
    """GRU states ``[B, T, d]`` of ``x [B, T, H]`` from ``h0 [B, d]``: the input gates in one GEMM on the
    caller's threads, then the compiled recurrence on one thread (without the GIL)."""
    batch, steps, width = x.shape
    gates_in = F.linear(x.detach().reshape(batch * steps, width), w_ih.detach(), b_ih.detach())
    out = x.new_empty(batch, steps, w_hh.shape[1])
    forward_loop(gates_in.view(batch, steps, -1).numpy(), _array(h0), _array(w_hh.t()), _array(b_hh), out.numpy())
    return out


class SequenceGRU(torch.autograd.Function):
    """One batch-first GRU layer over whole sequences, with a hand-written backward through time.

    Why: on CPU, ATen's GRU is a C++ loop of ~12 small ops per time step, and under autograd every one of them
    becomes a graph node — a 2 x 128-token router fine-tune step builds ~45k nodes and backward walks them one
    by one. Here the forward *is* that same fused call run without recording (so states are bit-identical to
    ``nn.GRU``), and backward recomputes all gates in a few large ops, runs a 4-op loop per step for the only
    truly sequential part (the gradient flowing from h_t to h_{t-1}), and gets every weight gradient from one
    GEMM over all steps. Gate order and equations are PyTorch's: r, z, n; h_t = (1 - z) n + z h_{t-1}.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, h0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                b_ih: torch.Tensor, b_hh: torch.Tensor) -> torch.Tensor:
        loops = compiled_loops_for(x, h0, w_ih, w_hh, b_ih, b_hh)
        if loops is not None:
            out = compiled_gru(x, h0, w_ih, w_hh, b_ih, b_hh, loops[0])
        else:
            with single_cpu_thread(x):
                out, _ = torch._VF.gru(x, h0.unsqueeze(0), (w_ih, w_hh, b_ih, b_hh), True, 1, 0.0, False, False, True)
        ctx.save_for_backward(x, h0, w_ih, w_hh, out)
        ctx.biases = (b_ih, b_hh)
        ctx.backward_loop = loops[1] if loops is not None else None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, h0, w_ih, w_hh, out = ctx.saved_tensors
        b_ih, b_hh = ctx.biases
        batch, steps, d = out.shape
        prev = torch.cat([h0.unsqueeze(1).to(out.dtype), out[:, :-1]], dim=1)  # h_{t-1}
        i_r, i_z, i_n = F.linear(x, w_ih, b_ih).chunk(3, dim=-1)
        h_r, h_z, h_n = F.linear(prev, w_hh, b_hh).chunk(3, dim=-1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        a = (1 - z) * (1 - n * n)  # dL/d(n pre-activation) = g * a, with g = dL/dh_t
        b = (prev - n) * z * (1 - z)  # dL/d(z pre-activation) = g * b
        c = a * h_n * r * (1 - r)  # dL/d(r pre-activation) = g * c
        if ctx.backward_loop is not None:  # the compiled loop, row by row ([B, T, ...] layouts)
            hidden_factor = torch.stack([c, b, a * r], dim=2)  # [B, T, 3, d]
            g_all = torch.empty_like(out)  # g_t = dL/dh_t
            ctx.backward_loop(g_all.numpy(), _array(grad_out), hidden_factor.view(batch, steps, 3 * d).numpy(),
                              _array(z), _array(w_hh))
        else:  # ATen: a 2-op step over all rows ([T, B, ...] layouts)
            hidden_factor = torch.stack([c, b, a * r], dim=2).transpose(0, 1).contiguous()  # [T, B, 3, d]
            keep = z.transpose(0, 1).contiguous()  # [T, B, d]: h_{t-1} reaches h_t directly with factor z
            upstream = grad_out.transpose(0, 1).contiguous()
            g_steps = torch.empty_like(upstream)  # written in place step by step
            g_steps[steps - 1] = upstream[steps - 1]
            for t in range(steps - 1, 0, -1):
                g = g_steps[t]
                d_hidden_gates = (g.unsqueeze(1) * hidden_factor[t]).view(batch, 3 * d)
                torch.addmm(torch.addcmul(upstream[t - 1], g, keep[t]), d_hidden_gates, w_hh, out=g_steps[t - 1])
            g_all, hidden_factor = g_steps.transpose(0, 1), hidden_factor.transpose(0, 1)  # [B, T, ...]
        d_hidden = (g_all.unsqueeze(2) * hidden_factor).reshape(batch, steps, 3 * d)
        d_input = (g_all.unsqueeze(2) * torch.stack([c, b, a], dim=2)).reshape(batch, steps, 3 * d)
        flat_hidden, flat_input = d_hidden.reshape(-1, 3 * d), d_input.reshape(-1, 3 * d)
        grads: list[torch.Tensor | None] = [None] * 6
        if ctx.needs_input_grad[0]:
            grads[0] = d_input @ w_ih
        if ctx.needs_input_grad[1]:
            grads[1] = (g_all[:, 0] * z[:, 0] + d_hidden[:, 0] @ w_hh).to(h0.dtype)
        if ctx.needs_input_grad[2]:
            grads[2] = flat_input.T @ x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[3]:
            grads[3] = flat_hidden.T @ prev.reshape(-1, d)
        if ctx.needs_input_grad[4]:
            grads[4] = flat_input.sum(0)
        if ctx.needs_input_grad[5]:
            grads[5] = flat_hidden.sum(0)
        return tuple(grads)


# --------------------------------------------------------------------------------------------------------------
# 3. Router
# --------------------------------------------------------------------------------------------------------------


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``F.normalize(x, dim=-1)``, the same values, in three ops: ``F.normalize`` reaches the norm through
    ``Tensor.norm`` and ``torch.norm``, Python-level argument handling that cost ~25 us per router call at
    decoding (docs/ARCHITECTURE.md, "Runtime speed"). Both end in ``linalg.vector_norm``, ``clamp_min(1e-12)``
    and a division (broadcast instead of ``expand_as``: the same quotients)."""
    return x / torch.linalg.vector_norm(x, 2, -1, True).clamp_min(1e-12)


class SpectraRouter(nn.Module):
    """SPECTRA router: returns ``(router_logits [N,E], routing_weights [N,k], selected_experts [N,k])``.

    Exactly three items, the transformers v5 router convention, so it drops into ``mlp.gate`` of Mixtral,
    Qwen-MoE or OLMoE blocks. ``router_logits`` are ``-C/tau`` (the selection score before the dual bias).
    The raw cosine scores ``S`` (for the entropy loss and analysis) go to ``context.records`` when collected.
    External tools hook modules of this class name and read these three items.
    """

    def __init__(self, hidden_size: int, knobs: dict[str, Any], layer_idx: int, context: RoutingContext | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx
        self.num_experts = int(knobs["num_experts"])
        self.top_k = int(knobs["top_k"])
        self.router_dim = int(knobs["router_dim"])
        self.temperature = float(knobs["temperature"])
        self.repulsion = float(knobs["repulsion"])
        self.sinkhorn_iters = int(knobs["sinkhorn_iters"])
        self.balance_mode = knobs["balance_mode"]
        self.sequence_balance = float(knobs.get("sequence_balance", 0.0))
        self.bias_ema = float(knobs["bias_ema"])
        self.bias_update_rate = float(knobs["bias_update_rate"])
        self.use_gru = bool(knobs["use_gru"])
        self.use_projector = bool(knobs["use_projector"])
        # carved blocks: how the converter and the re-correction after fine-tuning set the dual bias (not used here)
        self.carve_bias = knobs.get("carve_bias", "recall")
        # Not a submodule: one context object is shared by every router of the model.
        self.__dict__["context"] = context if context is not None else RoutingContext()

        d = self.router_dim
        if self.use_gru:
            self.gru = nn.GRU(hidden_size, d, batch_first=True)
        in_dim = hidden_size + (d if self.use_gru else 0)
        space = d if self.use_projector else in_dim
        if self.use_projector:
            self.projector = nn.Parameter(torch.empty(d, in_dim))
        self.expert_vectors = nn.Parameter(torch.empty(self.num_experts, space))
        self.register_buffer("dual_bias", torch.zeros(self.num_experts))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Orthogonal projector, random unit expert vectors, zero bias (calibration replaces the latter two)."""
        if self.use_projector:
            nn.init.orthogonal_(self.projector)
        nn.init.normal_(self.expert_vectors)
        self.expert_vectors.copy_(F.normalize(self.expert_vectors, dim=-1))
        self.dual_bias.zero_()
        if self.use_gru:
            self.gru.reset_parameters()

    # -- the pipeline, one method per step of docs/ARCHITECTURE.md, "Routing" -----------------------------------

    def sequential_state(
        self, h: torch.Tensor, mask: torch.Tensor | None, state0: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GRU states ``r [B,T,d]`` and the state after each row's last real token ``[B,d]``.

        Padding must never change what real tokens see, wherever it sits: each row's real tokens are moved to
        the front (a stable sort keeps their order), the GRU runs once over the batch, and states are scattered
        back. Pad positions get states too (of no consequence: their outputs are masked by the model).
        """
        batch, steps, width = h.shape
        h0 = (state0 if state0 is not None else h.new_zeros(batch, self.router_dim)).to(h.dtype)
        if mask is None or bool(mask.all()):
            out, last = self._run_gru(h, h0)
            return out, last
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        compact = h.gather(1, order.unsqueeze(-1).expand(-1, -1, width))
        out_compact, _ = self._run_gru(compact, h0)
        out = torch.zeros_like(out_compact).scatter(
            1, order.unsqueeze(-1).expand(-1, -1, self.router_dim), out_compact
        )
        n_real = mask.sum(dim=1)
        last = out_compact[torch.arange(batch, device=h.device), (n_real - 1).clamp(min=0)]
        last = torch.where((n_real > 0).unsqueeze(-1), last, h0)
        return out, last

    def _run_gru(self, h: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A recurrence over several tokens is hundreds of tiny sequential steps: on CPU extra threads only add
        sync overhead (measured 58 ms single-threaded vs 200-430 ms with 2 threads for 4x512 tokens), so it runs
        on one (the compiled loop by construction; its input-gate GEMM keeps the caller's threads). A one-token
        step keeps the caller's threads: it is one GEMV over the input weights (0.9 MB per
        layer at SmolLM2 size), which two threads read about twice as fast (docs/ARCHITECTURE.md, "Runtime speed").

        Without autograd the module wrapper is skipped (``nn.GRU.forward`` re-checks its arguments on every
        call, ~25 us). Several tokens run the compiled loop where it applies ("Compiled recurrences"), else
        ATen's sequence kernel; a one-token step that reaches this method (a plain decoding step runs the compiled
        ``_route_row`` instead, ``_route_step``) runs ATen's GRU cell: one fused call (18 us at
        router_dim 32, 27 us at 128) where the compiled loop's call costs 22 and 105 us (its W_hh transpose and
        array hand-over dominate a single step). The cell's states are ATen's sequence kernel's to the bit and the
        compiled loop's to ~1e-7 -- what the input GEMM over one row instead of many already changed: a cached
        decode equals a recompute to float rounding, as before (tests/test_runtime.py)."""
        gru = self.gru
        weights = (gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)
        if torch.is_grad_enabled() and (h.requires_grad or h0.requires_grad or any(w.requires_grad for w in weights)):
            out = SequenceGRU.apply(h, h0, *weights)
            return out, out[:, -1]
        if h.shape[1] == 1:
            last = self._gru_cell(h[:, 0].contiguous(), h0.contiguous())
            return last.unsqueeze(1), last
        loops = compiled_loops_for(h, h0, *weights)
        if loops is not None:
            out = compiled_gru(h, h0, *weights, loops[0])
            return out, out[:, -1]
        with single_cpu_thread(h):
            out, last = torch._VF.gru(h, h0.unsqueeze(0).contiguous(), weights, True, 1, 0.0, False, False, True)
        return out, last[0]

    def _gru_cell(self, h: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        """One GRU step of contiguous rows ``h [B, H]`` from ``h0 [B, d]``, no autograd: ATen's GRU cell, the same ops
        in the same order as one step of the sequence kernel (bit-identical states, tests/test_runtime.py)."""
        gru = self.gru
        return torch._VF.gru_cell(h, h0, gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)

    def sequence_select(
        self, logits: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None, state0: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k choices ``[B, T, k]`` under the per-sequence running-load correction, the correction each token
        got ``[B, T, E]``, and the sequence state after the last token ``[B, 2E + 1]``.

        A bias calibrated on one corpus balances text like it, but loads drift on text from other domains. Each
        sequence therefore lowers the experts its own earlier tokens SELECTED more than their share:
        ``-beta * E * (c / (n * k) - 1/E)``, with ``c`` the per-expert top-k counts of its real tokens before the
        last multiple of ``SEQUENCE_CHUNK`` below this token and ``n`` their number. Why hard counts: the loads
        that balance measures are hard selections, which carry the dual bias; the earlier rule (the mean SOFT
        distribution of the unbiased logits) over-corrected that mismatch, so beta > 1 made balance worse
        (docs/ARCHITECTURE.md, "The sequence-balance term"). Why chunks: a token's choice depends on earlier
        choices, so the rule is sequential; committing counts every ``SEQUENCE_CHUNK`` real tokens makes a
        prefill T / 16 small steps, and measured balance is the same as per token. Chunks count real tokens
        only (pads are never counted and take the chunk of the next real token), so routing stays causal and
        batch-invariant and a cached decode equals a full recompute: the state is ``[committed counts (E) |
        counts of the unfinished chunk (E) | real tokens seen (1)]``. On CPU with numba the torch chunk loop
        below gives way to one compiled call, ``_sequence_select_loop``, with the same bits (docs/ARCHITECTURE.md,
        "Runtime speed"); a one-token step without pads takes ``_decode_select``.
        """
        batch, steps, experts = logits.shape
        k, chunk = self.top_k, SEQUENCE_CHUNK
        state0 = state0.float() if state0 is not None else logits.new_zeros(batch, 2 * experts + 1, dtype=torch.float32)
        scores = logits.float() + bias.float()
        if mask is not None and bool(mask.all()):
            mask = None
        if steps == 1 and mask is None:
            return self._decode_select(scores, state0)
        # one call instead of ~10 ops per chunk (docs/ARCHITECTURE.md, "Runtime speed")
        kernel = compiled_sequence_select(scores) if steps >= COMPILED_SEQUENCE_MIN_STEPS else None
        if kernel is not None:
            real = mask.bool() if mask is not None else torch.ones(batch, steps, dtype=torch.bool)
            selected = torch.empty(batch, steps, self.top_k, dtype=torch.long)
            correction = torch.empty(batch, steps, experts)
            state = torch.empty(batch, 2 * experts + 1)
            kernel(scores.detach().contiguous().numpy(), real.contiguous().numpy(), state0.contiguous().numpy(),
                   float(self.sequence_balance), SEQUENCE_CHUNK, selected.numpy(), correction.numpy(), state.numpy())
            return selected, correction, state
        committed0, pending0 = state0[:, :experts], state0[:, experts:2 * experts]
        seen0 = state0[:, -1].round().long()
        first = seen0 // chunk  # chunk index (over the whole sequence) of this call's first token
        offset = seen0 % chunk
        real = mask.long() if mask is not None else None
        aligned = mask is None and bool((offset == offset[0]).all())
        if aligned:  # every row's chunks start at the same positions: slices
            start = int(offset[0])
            bounds = [(max(0, j * chunk - start), min(steps, (j + 1) * chunk - start))
                      for j in range((steps + start + chunk - 1) // chunk)]
            chunk_of = None
        else:  # padding, or rows at different points of their chunks: masks over the whole call
            index = seen0.unsqueeze(1) + torch.cumsum(real, 1) - real if real is not None else seen0.unsqueeze(1) + torch.arange(steps, device=logits.device)
            chunk_of = index // chunk - first.unsqueeze(1)
            bounds = [(0, steps)] * (int(chunk_of.max()) + 1 if steps else 0)
        seen = seen0 + (real.sum(1) if real is not None else steps)
        last = seen // chunk - first  # the unfinished chunk (its counts stay pending)
        selected = logits.new_zeros(batch, steps, k, dtype=torch.long)
        correction = logits.new_zeros(batch, steps, experts, dtype=torch.float32)
        committed = committed0  # what the current chunk's correction reads
        final = committed0  # the committed counts after this call
        new_counts = torch.zeros_like(committed0)
        for j, (lo, hi) in enumerate(bounds):
            fix = self._balance_fix(committed, (first + j) * chunk)  # (first + j) * chunk: real tokens committed
            part = torch.topk(scores[:, lo:hi] + fix, k, dim=-1).indices
            if chunk_of is None:
                selected[:, lo:hi] = part
                correction[:, lo:hi] = fix
                counted = torch.ones(batch, (hi - lo) * k, device=logits.device)
            else:
                here = chunk_of == j
                selected = torch.where(here.unsqueeze(-1), part, selected)
                correction = torch.where(here.unsqueeze(-1), fix, correction)
                counted = (here if mask is None else here & mask).repeat_interleave(k, dim=1).float()
            hits = torch.zeros_like(committed0).scatter_add_(1, part.reshape(batch, -1), counted)
            new_counts = new_counts + hits
            carried = pending0 + hits if j == 0 else hits  # chunk j's counts, the cache's pending ones included
            committed = committed + carried
            final = final + (j < last).float().unsqueeze(1) * carried  # only finished chunks commit
        state = torch.cat([final, committed0 + pending0 + new_counts - final, seen.float().unsqueeze(1)], dim=-1)
        return selected, correction, state

    def _balance_fix(self, committed: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """The correction ``[B, 1, E]`` from the committed counts ``[B, E]`` of ``before`` real tokens (``[B]`` or
        ``[B, 1]``): ``-beta * E * (c / (n * k) - 1/E)``, times ``n > 0`` (nothing while no token is committed)."""
        experts = committed.shape[-1]
        before = before.float().view(-1, 1)
        share = committed / (before * self.top_k).clamp(min=1)
        return ((-self.sequence_balance * experts * (share - 1.0 / experts)) * (before > 0)).unsqueeze(1)

    def _decode_select(self, scores: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``sequence_select`` for one real token per row (a decoding step) and its float state ``[B, 2E + 1]``: the
        same values without the chunk loop's masks and index conversions (88 us per call on the 2-core box, 108 us
        before this path was trimmed; 30 calls per decoded token)."""
        experts, k, chunk = scores.shape[-1], self.top_k, SEQUENCE_CHUNK
        committed, pending, seen = state[:, :experts], state[:, experts:2 * experts], state[:, 2 * experts:]
        fix = self._balance_fix(committed, seen - seen.remainder(chunk))  # seen - seen % chunk: real tokens committed
        selected = torch.topk(scores + fix, k, dim=-1).indices
        counts = pending.scatter_add(1, selected.view(-1, k), torch.ones(selected.shape[0], k, device=scores.device))
        seen = seen + 1
        finished = (seen.remainder(chunk) == 0).float()  # this token completes its chunk: commit its counts
        moved = counts * finished
        state = torch.cat([committed + moved, counts - moved, seen], -1)
        return selected, fix.expand(-1, 1, experts), state

    def express(self, h: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        """z = normalize(P [h; r]): the token's expression vector on the unit sphere.

        With a projector, P [h; r] = P_h h + P_r r: two GEMMs, no [N, H+d] concatenation copy.
        """
        if not self.use_projector:
            return unit_rows(torch.cat([h, r], dim=-1) if r is not None else h)
        if h.dim() == 2:  # rows already (a decoding step): no reshape and view ops
            x = _linear(h, self.projector[:, : self.hidden_size])
            return unit_rows(x if r is None else x + _linear(r, self.projector[:, self.hidden_size :]))
        lead = h.shape[:-1]  # rows flattened: the ``mm`` that ``F.linear`` folds a [B, T, H] input into, called directly
        x = _linear(h.reshape(-1, h.shape[-1]), self.projector[:, : self.hidden_size])
        if r is not None:
            x = x + _linear(r.reshape(-1, r.shape[-1]), self.projector[:, self.hidden_size :])
        return unit_rows(x).view(*lead, -1)

    def unit_expert_vectors(self) -> torch.Tensor:
        """``mu [E, d]``, a fresh tensor the caller may keep or change (routing itself uses ``expert_geometry``)."""
        return unit_rows(self.expert_vectors)

    def expert_geometry(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unit expert vectors ``mu [E, d]`` and the OSR repulsion weights ``(G ⊙ (1 - I))² [E, E]`` (None when
        repulsion is off), with ``G = mu mu^T``.

        Both depend on the parameters alone, so on CPU without autograd they are reused while the expert
        vectors hold the same values: recomputing them cost 8 small ops per router call. Reuse is decided by
        comparing the vectors with a snapshot (one op), not by version counters, which an in-place edit through
        ``.data`` does not bump. On an accelerator the comparison would sync every call, so nothing is reused.
        """
        vectors = self.expert_vectors
        reusable = not torch.is_grad_enabled() and vectors.device.type == "cpu"
        if reusable:
            flags = (self.repulsion, torch.is_inference_mode_enabled(), vectors.dtype)
            cached = self.__dict__.get("_geometry")
            if cached is not None and cached[0] == flags and cached[1].shape == vectors.shape and torch.equal(cached[1], vectors):
                return cached[2]
        mu = unit_rows(vectors)
        repulsion = None
        if self.repulsion != 0.0:
            gram = mu @ mu.T
            off_diagonal = gram * (1.0 - torch.eye(self.num_experts, device=gram.device, dtype=gram.dtype))
            repulsion = off_diagonal.pow(2)
        if reusable:
            self.__dict__["_geometry"] = (flags, vectors.detach().clone(), (mu, repulsion))
        return mu, repulsion

    def _repulsion_term(self, scores: torch.Tensor,
                        geometry: tuple[torch.Tensor, torch.Tensor | None] | None) -> torch.Tensor | None:
        """``lambda |S| @ (G ⊙ (1 - I))²`` (None when repulsion is off): what ``osr_cost`` adds to ``-S`` and
        ``selection_logits`` subtracts from ``S``. ``geometry``: ``expert_geometry()`` when the caller already has
        it (one check per routing call)."""
        repulsion = (geometry or self.expert_geometry())[1]
        if repulsion is None:
            return None
        weighted = self.repulsion * scores.abs()
        return torch.mm(weighted, repulsion) if weighted.dim() == 2 else weighted @ repulsion  # what ``@`` runs for 2-D

    def osr_cost(self, scores: torch.Tensor,
                 geometry: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        """C = -S + lambda * |S| @ (G ⊙ (1 - I))²: an expert similar to other strong experts costs more."""
        term = self._repulsion_term(scores, geometry)
        return -scores if term is None else -scores + term

    def selection_logits(self, scores: torch.Tensor,
                         geometry: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        """The routing logits ``-C / tau`` of cosine scores ``S``, computed as ``(S - lambda |S| @ R) / tau``: the same
        bits as negating ``osr_cost`` (IEEE negation and rounding are symmetric) in two fewer ops per call."""
        term = self._repulsion_term(scores, geometry)
        return (scores if term is None else scores - term) / self.temperature

    def project(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Expression vectors ``z [N, d]`` of a ``[B, T, H]`` batch (used for k-means prototype init)."""
        h = hidden_states.to(self._param_dtype())
        r = self.sequential_state(h, mask, None)[0] if self.use_gru else None
        z = self.express(h, r)
        return z.reshape(-1, z.shape[-1]) if mask is None else z[mask]

    @torch.no_grad()
    def selection_scores(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The routing logits ``-C/tau``, ``[N, E]`` float32, of ``[B, T, H]`` sequences routed on their own (no
        cache, no padding): what ``select`` ranks. Changes nothing, in any mode: bias calibration corrects
        ``dual_bias`` against these scores (E floats a token instead of the hidden size)."""
        batch, steps = hidden_states.shape[0], hidden_states.shape[1]
        h = hidden_states.to(self._param_dtype())
        r = self.sequential_state(h, None, None)[0] if self.use_gru else None
        geometry = self.expert_geometry()
        scores = torch.mm(self.express(h, r).reshape(batch * steps, -1), geometry[0].t())
        return self.selection_logits(scores, geometry).float()

    @torch.no_grad()
    def select(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The forward's top-k choices ``[B, T, k]`` for ``selection_scores`` viewed as ``[B, T, E]`` whole
        sequences, under ``bias`` (default: ``dual_bias``): ``topk(logits + bias)``, through the per-sequence
        correction when it is on (then a token's choice depends on its sequence's earlier choices)."""
        bias = self.dual_bias if bias is None else bias
        if self.sequence_balance > 0:
            return self.sequence_select(logits, bias, None, None)[0]
        return torch.topk(logits.float() + bias.float(), self.top_k, dim=-1).indices

    # -- forward -----------------------------------------------------------------------------------------------

    def _param_dtype(self) -> torch.dtype:
        return self.expert_vectors.dtype

    def input_shape(self, hidden_states: torch.Tensor) -> tuple[int, int]:
        """``(batch, time)`` of this call's hidden states, which an MoE block may pass flattened ``[N, H]``."""
        if hidden_states.dim() == 3:
            return hidden_states.shape[0], hidden_states.shape[1]
        n_tokens = hidden_states.shape[0]
        shape = self.context.batch_shape
        if shape is not None and shape[0] * shape[1] == n_tokens:
            return shape
        return 1, n_tokens  # used standalone: one sequence

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._route(hidden_states)

    def _cached_state(self, batch: int) -> tuple[dict[int, torch.Tensor] | None, torch.Tensor | None]:
        """The cache's per-layer router states (None without a cache) and this layer's ``[B, d + 2E + 1]`` row:
        ``[GRU state (d) | committed counts (E) | pending counts (E) | tokens (1)]`` (None before the first call)."""
        cache = self.context.cache
        states = router_states_of(cache) if cache is not None else None
        state0 = states.get(self.layer_idx) if states is not None else None
        if state0 is not None and state0.shape[0] != batch:
            raise ValueError(f"router state of layer {self.layer_idx} has batch {state0.shape[0]} but the input has {batch}")
        return states, state0

    def _store_state(self, states: dict[int, torch.Tensor], last: torch.Tensor | None, totals: torch.Tensor | None,
                     batch: int, like: torch.Tensor) -> None:
        """Write this layer's router state after the call (see ``_cached_state``)."""
        gru_state = (last if last is not None else like.new_zeros(batch, 0)).detach().float()
        if totals is None:  # no sequence term: its counts stay zero (one op instead of zeros + cat)
            states[self.layer_idx] = F.pad(gru_state, (0, 2 * self.num_experts + 1))
        else:
            states[self.layer_idx] = torch.cat([gru_state, totals.detach().float()], dim=-1)

    def _is_plain_step(self, steps: int) -> bool:
        """A decoding step that ``_route_step`` may take: one token per row, no padding in it, no autograd, no
        training update, no records, the dual bias (``in_batch`` needs the batch's potentials), a GRU."""
        ctx = self.context
        return (steps == 1 and ctx.token_mask is None and ctx.records is None and not self.training
                and not torch.is_grad_enabled() and self.use_gru and self.balance_mode == "dual_bias")

    def _route_step(self, hidden_states: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_route`` for a plain decoding step (``_is_plain_step``): the same kernels on the same values, so the
        same bits (tests/test_runtime.py), without the general path's masks, reshapes, branches and no-op calls
        (docs/ARCHITECTURE.md, "Runtime speed")."""
        h = hidden_states.reshape(batch, self.hidden_size)
        dtype = self._param_dtype()
        if h.dtype != dtype:  # dtype and layout checked in Python: each skipped no-op call saves ~1-2 us
            h = h.to(dtype)
        if not h.is_contiguous():
            h = h.contiguous()
        states, state0 = self._cached_state(batch)
        step = compiled_route_step(h, self.expert_vectors) if self.use_projector else None
        if step is not None:
            return self._compiled_step(step, h, hidden_states.dtype, states, state0, batch)
        d = self.router_dim
        h0 = state0[:, :d].to(dtype).contiguous() if state0 is not None else h.new_zeros(batch, d)
        last = self._gru_cell(h, h0)
        geometry = self.expert_geometry()
        scores = torch.mm(self.express(h, last), geometry[0].t())
        router_logits = self.selection_logits(scores, geometry)
        totals = None
        if self.sequence_balance > 0:
            totals0 = state0[:, d:].float() if state0 is not None else router_logits.new_zeros(
                batch, 2 * self.num_experts + 1, dtype=torch.float32)
            biased = router_logits.float().view(batch, 1, -1) + self.dual_bias.float()  # [B, 1, E], as the chunked path
            selected, _, totals = self._decode_select(biased, totals0)
            selected = selected.view(batch, -1)
        else:
            selected = torch.topk(router_logits + self.dual_bias, self.top_k, dim=-1).indices
        if states is not None:
            self._store_state(states, last, totals, batch, h)
        weights = torch.softmax(scores.gather(1, selected) / self.temperature, dim=-1)
        return router_logits, weights if weights.dtype == hidden_states.dtype else weights.to(hidden_states.dtype), selected

    def _compiled_step(self, step: Callable[..., None], h: torch.Tensor, out_dtype: torch.dtype,
                       states: dict[int, torch.Tensor] | None, state0: torch.Tensor | None,
                       batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_route_step`` through the compiled decoding step (``_route_step_loop``): the two GEMVs over the token's
        input on the caller's threads, everything after them in one call instead of ~20 small ops (docs/
        ARCHITECTURE.md, "Runtime speed"). Not the torch step's bits (sums in float64, as the compiled
        recurrence that a recompute runs): the same choices up to near-ties, logits within ~1e-6
        (tests/test_runtime.py)."""
        gru, d, experts, top_k = self.gru, self.router_dim, self.num_experts, self.top_k
        gates_in = torch.addmm(gru.bias_ih_l0, h, gru.weight_ih_l0.t())
        projected = torch.mm(h, self.projector[:, : self.hidden_size].t())
        h0 = state0[:, :d].to(h.dtype) if state0 is not None else h.new_zeros(batch, d)
        balance = self.sequence_balance
        totals = state0[:, d:] if state0 is not None and balance > 0 else torch.zeros(batch, 2 * experts + 1)
        mu, repulsion = self.expert_geometry()
        state = torch.empty(batch, d + 2 * experts + 1)  # float32, as the cache keeps router states
        last, logits, weights = h.new_empty(batch, d), h.new_empty(batch, experts), h.new_empty(batch, top_k)
        selected = torch.empty(batch, top_k, dtype=torch.long)
        step(gates_in.numpy(), projected.numpy(), h0.numpy(), gru.weight_hh_l0.detach().numpy(),
             gru.bias_hh_l0.detach().numpy(), self.projector.detach()[:, self.hidden_size :].numpy(), mu.numpy(),
             (repulsion if repulsion is not None else h.new_zeros(0, 0)).numpy(), float(self.repulsion),
             float(self.temperature), self.dual_bias.to(h.dtype).numpy(), float(balance), float(SEQUENCE_CHUNK),
             totals.numpy(), last.numpy(), state.numpy(), logits.numpy(), selected.numpy(), weights.numpy())
        if states is not None:
            states[self.layer_idx] = state
        return logits, weights if weights.dtype == out_dtype else weights.to(out_dtype), selected

    def _route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx = self.context
        batch, steps = self.input_shape(hidden_states)
        if self._is_plain_step(steps):
            return self._route_step(hidden_states, batch)
        h = hidden_states.reshape(batch, steps, self.hidden_size).to(self._param_dtype())
        mask = ctx.token_mask if ctx.token_mask is not None and tuple(ctx.token_mask.shape) == (batch, steps) else None

        states, state0 = self._cached_state(batch)
        width = self.router_dim if self.use_gru else 0
        gru0, totals0 = (state0[:, :width], state0[:, width:]) if state0 is not None else (None, None)
        r = last = None
        if self.use_gru:
            r, last = self.sequential_state(h, mask, gru0)
        z = self.express(h, r).reshape(batch * steps, -1)
        geometry = self.expert_geometry()
        scores = torch.mm(z, geometry[0].t())  # S [N, E], cosine similarities
        router_logits = self.selection_logits(scores, geometry)
        flat_mask = mask.reshape(-1) if mask is not None else None

        unbiased = router_logits.detach()
        totals = None

        def potentials_of(ranked: torch.Tensor) -> torch.Tensor | None:
            """Sinkhorn's column potentials of the real tokens' rows (None when there are none)."""
            real = ranked if flat_mask is None else ranked[flat_mask]
            return sinkhorn(real, self.top_k, self.sinkhorn_iters)[1] if real.shape[0] > 0 else None

        if self.sequence_balance > 0:
            # The per-sequence correction depends on the sequence's earlier choices, so selection comes first
            # (with the bias as it is; in_batch: the potentials of the logits), then the training update of the
            # bias from the potentials of what selection ranked -- correction included, so the bias does not
            # correct twice what the sequence term balances; it takes effect from the next call.
            bias = self.dual_bias
            if self.balance_mode == "in_batch":
                potentials = potentials_of(unbiased)
                bias = potentials if potentials is not None else bias
            picked, correction, totals = self.sequence_select(unbiased.view(batch, steps, -1), bias, mask, totals0)
            selected = picked.reshape(batch * steps, -1)
            if self.training and self.balance_mode == "dual_bias":
                potentials = potentials_of(unbiased.float() + correction.reshape(batch * steps, -1))
                if potentials is not None:
                    with torch.no_grad():
                        self.dual_bias.lerp_(potentials.to(self.dual_bias.dtype), self.bias_ema)
        else:
            bias = self.dual_bias
            potentials = potentials_of(unbiased) if self.balance_mode == "in_batch" or self.training else None
            if potentials is not None and self.balance_mode == "in_batch":
                bias = potentials.to(bias.dtype)
            elif potentials is not None:
                with torch.no_grad():
                    self.dual_bias.lerp_(potentials.to(self.dual_bias.dtype), self.bias_ema)
            selected = torch.topk(unbiased + bias, self.top_k, dim=-1).indices
        if states is not None:
            self._store_state(states, last, totals, batch, h)
        weights = torch.softmax(scores.gather(1, selected) / self.temperature, dim=-1)

        if self.training and self.bias_update_rate > 0 and self.balance_mode == "dual_bias":
            real_selected = selected if flat_mask is None else selected[flat_mask]
            self.correct_bias(torch.bincount(real_selected.reshape(-1), minlength=self.num_experts), self.bias_update_rate)

        if ctx.records is not None:
            ctx.records.append(
                {"layer": self.layer_idx, "logits": router_logits, "scores": scores, "selected": selected,
                 "weights": weights, "mask": flat_mask}
            )
        return router_logits, weights.to(hidden_states.dtype), selected

    @torch.no_grad()
    def correct_bias(self, loads: torch.Tensor, rate: float) -> None:
        """Move the dual bias towards equal HARD top-k loads: overloaded experts down, underloaded up."""
        loads = loads.to(self.dual_bias.dtype)
        mean = loads.mean().clamp(min=1e-9)
        self.dual_bias.add_(rate * (mean - loads) / mean)
        self.dual_bias.sub_(self.dual_bias.mean())

    def orthogonality_loss(self) -> torch.Tensor:
        """||P P^T - I||_F^2 on the expression projector (0 when the projector is ablated)."""
        if not self.use_projector:
            return self.expert_vectors.new_zeros(())
        gram = self.projector @ self.projector.T
        return (gram - torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)).pow(2).sum()


def routing_entropy(scores: torch.Tensor, temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of the entropy of softmax(S/tau) over all experts."""
    log_p = torch.log_softmax(scores.float() / temperature, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return entropy.mean() if mask is None else entropy[mask].mean()


# --------------------------------------------------------------------------------------------------------------
# 4. Experts
# --------------------------------------------------------------------------------------------------------------


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for rows ``[N, in]``, calling the kernel it dispatches to (``mm`` / ``addmm`` on ``weight.t()``)
    directly: the same values, without the ~5 wrapper ops per call that a decoding step pays ~10 times per layer
    (docs/ARCHITECTURE.md, "Runtime speed"). Other shapes go through ``F.linear``."""
    if x.dim() != 2:
        return F.linear(x, weight, bias)
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def _global_module_hooks() -> bool:
    """Whether any global ``nn.Module`` forward hook is registered (then module calls must stay module calls)."""
    hooks = torch.nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks)


#: Low-rank updates of a fused ``[E, out, in]`` tensor: ``(lhs [E, out, r], rhs [E, r, in], scale)`` each.
LowRankTerms = Sequence[tuple[torch.Tensor, torch.Tensor, float]]


def peft_expert_lora(experts: nn.Module) -> tuple[nn.Module, dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]] | None:
    """``(SpectraExperts, low-rank terms per tensor name)`` when ``experts`` is wrapped by PEFT's LoRA on its fused
    tensors (``target_parameters``), else ``None`` (then the module runs as it is).

    Why: PEFT's ``ParamWrapper.forward`` registers a parametrization on every call, and torch's consistency check
    evaluates the fold ``W + s * lhs @ rhs`` of the whole ``[E, out, in]`` stack once per registration: r times
    the stack's multiply-adds per layer per forward, whichever k experts the tokens use (decoding with an
    unmerged adapter measured 5.06x the merged model, docs/ARCHITECTURE.md "Runtime speed"). Reading the factors
    (PEFT's ``get_delta_factors``) and applying them to the routed rows computes the same function in r-wide
    GEMMs. Only the plain case is taken over -- one active adapter, not merged, adapters enabled, a float
    tensor -- and the two where PEFT's forward calls the base alone (merged with adapters on, unmerged with
    adapters off: no terms); anything else (and a PEFT without ``get_delta_factors``) runs PEFT's own forward.
    Matched by class name: the runtime never imports peft.
    """
    terms: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    module = experts
    while type(module).__name__ == "ParamWrapper":
        if module.merged != bool(module.disable_adapters):  # merged and on, or unmerged and off: PEFT calls the base
            module = module.base_layer
            continue
        get_factors = getattr(module, "get_delta_factors", None)
        if get_factors is None or module.merged or getattr(module, "num_experts", 0) < 2:
            return None
        active = [name for name in module.active_adapters if name in module.lora_A]
        if len(active) != 1:
            return None
        lhs, rhs, scaling = get_factors(active[0])
        terms.setdefault(module.parameter_name, []).append((lhs, rhs, float(scaling)))
        module = module.base_layer
    if module is experts or type(module).__name__ != "SpectraExperts":
        return None
    if any(getattr(module, name).dtype not in (torch.float32, torch.float16, torch.bfloat16) for name in terms):
        return None
    return module, terms


def peft_saved_module(module: nn.Module | None) -> nn.Module | None:
    """The module that PEFT's ``ModulesToSaveWrapper`` (``modules_to_save``: a router or an estimate trained in
    full beside a LoRA adapter) would call -- the active adapter's copy, or the original while adapters are
    disabled -- and any other module itself; ``None`` for a wrapper that a hook watches (its call must happen).
    Matched by class name and read as PEFT's forward reads it: the runtime never imports peft."""
    if module is None or type(module).__name__ != "ModulesToSaveWrapper":
        return module
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    active = list(module.active_adapters)
    if module.disable_adapters or not active or any(name not in module._adapters for name in active):
        return module.original_module
    return module.modules_to_save[active[0]]


def run_experts(experts: nn.Module, hidden: torch.Tensor, selected: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The block's call of its experts: through PEFT's expert LoRA as low-rank terms where ``peft_expert_lora``
    can read them, else the module's own forward."""
    unwrapped = peft_expert_lora(experts)
    if unwrapped is None:
        return experts(hidden, selected, weights)
    base, low_rank = unwrapped
    return base(hidden, selected, weights, low_rank=low_rank)


@dataclass
class FactoredLinear:
    """One linear of every expert, as the sorted-rows function reads it: ``base [E, out, in]``, an optional
    ``bias [E, out]`` and low-rank terms ``(lhs [E, out, r], rhs [E, r, in], scale)`` (``W_e = base_e +
    sum scale * lhs_e @ rhs_e``). For gradients the same structure holds each tensor's gradient, or ``None``."""

    base: torch.Tensor | None
    bias: torch.Tensor | None
    terms: list[tuple[torch.Tensor | None, torch.Tensor | None, float]]


@dataclass
class SortedExpertsSpec:
    """What ``SortedExpertsFunction`` needs besides tensors: the experts module (kind, activation), the rows
    per expert in the sorted order, and per linear whether it has a bias and its low-rank scales."""

    experts: nn.Module
    counts: list[int]
    layout: list[tuple[bool, list[float]]]

    def unpack(self, tensors: Sequence[torch.Tensor | None]) -> list[FactoredLinear]:
        """The flat tensor list of ``SortedExpertsFunction.apply`` (or its gradients) as one ``FactoredLinear``
        per linear."""
        linears, at = [], 0
        for has_bias, scales in self.layout:
            base, at = tensors[at], at + 1
            bias = None
            if has_bias:
                bias, at = tensors[at], at + 1
            terms = []
            for scale in scales:
                terms.append((tensors[at], tensors[at + 1], scale))
                at += 2
            linears.append(FactoredLinear(base, bias, terms))
        return linears


def _factored_linear(x: torch.Tensor, linear: FactoredLinear, expert: int,
                     out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Expert ``expert``'s linear on rows ``x``: the ops of ``SpectraExperts._expert_linear`` in the same order
    (bit-identical), into ``out`` when given; also each low-rank term's ``x @ rhs_e.T`` (its backward needs it)."""
    if not linear.terms:
        if linear.bias is None:
            return torch.mm(x, linear.base[expert].t(), out=out), []
        return torch.addmm(linear.bias[expert], x, linear.base[expert].t(), out=out), []
    y = _linear(x, linear.base[expert], None if linear.bias is None else linear.bias[expert])
    inner = []
    for lhs, rhs, scale in linear.terms:
        u = torch.mm(x, rhs[expert].t())
        y = y + scale * torch.mm(u, lhs[expert].t())
        inner.append(u)
    if out is not None:
        out.copy_(y)
        y = out
    return y, inner


def _factored_linear_backward(grad_y: torch.Tensor, x: torch.Tensor | None, inner: list[torch.Tensor], linear: FactoredLinear,
                              grads: FactoredLinear, expert: int, need_input: bool = True,
                              out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Backward of ``_factored_linear`` for one expert: accumulates the weight gradients into expert
    ``expert``'s slice of ``grads`` (zero tensors of the whole stacks, ``None`` where not needed) and returns
    the input gradient (into ``out`` when given), or ``None`` when ``need_input`` is false. ``x`` (the rows) may
    be ``None`` where ``_reads_input(grads)`` is false."""
    grad_x = torch.mm(grad_y, linear.base[expert], out=out) if need_input else None
    if grads.base is not None:
        grads.base[expert].addmm_(grad_y.t(), x)
    if grads.bias is not None:
        grads.bias[expert].add_(grad_y.sum(0))
    for (lhs, rhs, scale), (grad_lhs, grad_rhs, _), u in zip(linear.terms, grads.terms, inner):
        through_lhs = torch.mm(grad_y, lhs[expert])  # [n, r]
        if grad_x is not None:
            grad_x.addmm_(through_lhs, rhs[expert], alpha=scale)
        if grad_lhs is not None:
            grad_lhs[expert].addmm_(grad_y.t(), u, alpha=scale)
        if grad_rhs is not None:
            grad_rhs[expert].addmm_(through_lhs.t(), x, alpha=scale)
    return grad_x


def _reads_input(grads: FactoredLinear) -> bool:
    """Whether the backward of a linear needs its input rows: only for the base's or an ``rhs``'s gradient."""
    return grads.base is not None or any(grad_rhs is not None for _, grad_rhs, _ in grads.terms)


def _gate_and_up(first: torch.Tensor, gated: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first projection's output as (what the activation takes, what it multiplies): a gated expert's
    gate | up halves as two views (as ``SpectraExperts.expert`` splits them), an ``mlp`` expert's whole output."""
    if not gated:
        return first, None
    half = first.shape[-1] // 2
    return first[..., :half], first[..., half:]


def _activation_backward(act: Callable[[torch.Tensor], torch.Tensor], grad: torch.Tensor,
                         pre: torch.Tensor) -> torch.Tensor:
    """``d act(pre) / d pre`` applied to ``grad``, for ``act`` as ``SpectraExperts.activation`` returned it: ATen's
    own SiLU backward (the kernel autograd runs for llama-family experts) when it is an unhooked SiLU's
    ``forward``, else the activation's autograd on a detached copy, whatever it is."""
    owner = getattr(act, "__self__", None)
    if isinstance(owner, nn.SiLU) or type(owner).__name__ == "SiLUActivation":
        return torch.ops.aten.silu_backward(grad, pre)
    with torch.enable_grad():
        leaf = pre.detach().requires_grad_()
        activated = act(leaf)
    return torch.autograd.grad(activated, leaf, grad)[0]


class SortedExpertsFunction(torch.autograd.Function):
    """Every expert's FFN on its contiguous group of sorted rows, ``grouped [N*k, H] -> [N*k, H]`` (unweighted),
    with a hand-written backward; used by ``SpectraExperts.dispatch`` when autograd records.

    Why (docs/ARCHITECTURE.md, "Runtime speed"): under autograd each expert's rows, its gate/up halves and its
    LoRA factors are views whose backward allocates a zero-filled tensor of the WHOLE base and copies the
    slice's gradient into it -- per expert, per layer, per step (~5.5k ``fill_`` and ~21k ``copy_`` calls in a
    2 x 128-token LoRA step of an 8x top-2 SmolLM2). Here the forward runs ``SpectraExperts.expert``'s ops
    unrecorded (bit-identical outputs, written into one buffer); backward walks the experts once, writes each
    one's input gradient into its rows of one buffer and each weight gradient into its expert's slice of one
    zero tensor per parameter. Gradients equal autograd's to float rounding (tests/test_runtime.py).
    """

    @staticmethod
    def forward(ctx: Any, spec: SortedExpertsSpec, grouped: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        first_linear, second_linear = spec.unpack(tensors)
        gated = spec.experts.kind == "gated"
        act = spec.experts.activation()
        outputs = torch.empty_like(grouped)
        saved: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]] | None] = []
        start = 0
        for expert, count in enumerate(spec.counts):
            rows = slice(start, start + count)
            start += count
            if count == 0:
                saved.append(None)
                continue
            first, first_inner = _factored_linear(grouped[rows], first_linear, expert)
            pre, up = _gate_and_up(first, gated)
            activated = act(pre)
            hidden = activated * up if gated else activated
            _, second_inner = _factored_linear(hidden, second_linear, expert, out=outputs[rows])
            saved.append((first, activated, first_inner, second_inner))
        ctx.spec, ctx.per_expert = spec, saved
        ctx.save_for_backward(grouped, *tensors)
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        spec: SortedExpertsSpec = ctx.spec
        grouped, *tensors = ctx.saved_tensors
        first_linear, second_linear = spec.unpack(tensors)
        grads = [torch.zeros_like(t) if need else None for t, need in zip(tensors, ctx.needs_input_grad[2:])]
        first_grads, second_grads = spec.unpack(grads)
        gated = spec.experts.kind == "gated"
        act = spec.experts.activation()
        need_hidden = _reads_input(second_grads)  # a router-only step needs no expert's hidden rows
        need_input = ctx.needs_input_grad[1]
        grad_grouped = torch.empty_like(grouped) if need_input else None
        start = 0
        for expert, count in enumerate(spec.counts):
            rows = slice(start, start + count)
            start += count
            if count == 0:
                continue
            first, activated, first_inner, second_inner = ctx.per_expert[expert]
            pre, up = _gate_and_up(first, gated)
            hidden = (activated * up if gated else activated) if need_hidden else None
            grad_hidden = _factored_linear_backward(grad_outputs[rows].contiguous(), hidden, second_inner, second_linear,
                                                    second_grads, expert)
            grad_pre = _activation_backward(act, grad_hidden * up if gated else grad_hidden, pre)
            grad_first = torch.cat([grad_pre, grad_hidden * activated], dim=-1) if gated else grad_pre
            _factored_linear_backward(grad_first, grouped[rows], first_inner, first_linear, first_grads, expert,
                                      need_input=need_input, out=grad_grouped[rows] if need_input else None)
        return (None, grad_grouped, *grads)  # ctx keeps its tensors: a retained graph may run backward again


class SpectraExperts(nn.Module):
    """E experts as fused 3-D tensors.

    ``gated`` (llama-style SwiGLU): ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]`` — the layout of
    transformers' MixtralExperts. ``mlp`` (gpt2-style): ``up_proj [E, I, H]`` + ``up_bias [E, I]``,
    ``down_proj [E, H, I]`` + ``down_bias [E, H]``.

    Dispatch: the N*k (token, slot) pairs are sorted by expert once, each expert runs one matmul over its
    contiguous group, and its weighted rows are added back into the output with ``index_add_``.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, kind: str, act: str):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size, self.kind = (
            num_experts, hidden_size, intermediate_size, kind,
        )
        self.act_fn = ACT2FN[act]
        if kind == "gated":
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        else:
            self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
            self.up_bias = nn.Parameter(torch.zeros(num_experts, intermediate_size))
            self.down_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, std)

    def fused_weight(self, name: str, extra: LowRankTerms = ()) -> tuple[torch.Tensor, LowRankTerms]:
        """A fused expert tensor as ``(base [E, out, in], low-rank terms)`` with ``W_e = base_e + sum s * lhs_e @ rhs_e``.

        Why: PEFT LoRA on ``target_parameters`` registers a parametrization that folds its factors into the whole
        ``[E, out, in]`` stack (``r`` times the stack's size in multiply-adds, per layer, per decoding step). When
        every parametrization of the tensor is such a low-rank fold (it exposes ``lhs``, ``rhs`` and ``scaling``)
        the experts apply the factors to their own rows instead: ``x @ W_e.T + s * (x @ rhs_e.T) @ lhs_e.T``, the
        same function, and no folded stack in the autograd graph. PEFT still evaluates the fold once when it
        registers (torch's consistency check); the MoE block avoids that by reading the factors itself
        (``peft_expert_lora``) and passing them here as ``extra``. Any other parametrization is read as the full
        tensor it produces.
        """
        parametrizations = self._modules.get("parametrizations")  # where torch registers them; no getattr miss
        if parametrizations is not None and name in parametrizations:
            chain = parametrizations[name]
            if all(hasattr(p, "lhs") and hasattr(p, "rhs") and hasattr(p, "scaling") for p in chain):
                return chain.original, [(p.lhs, p.rhs, float(p.scaling)) for p in chain] + list(extra)
        return getattr(self, name), list(extra)

    @staticmethod
    def _expert_linear(
        x: torch.Tensor, weight: tuple[torch.Tensor, LowRankTerms], index: int,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        base, low_rank = weight
        out = _linear(x, base[index], bias)
        for lhs, rhs, scale in low_rank:
            out = out + scale * _linear(_linear(x, rhs[index].to(x.dtype)), lhs[index].to(x.dtype))
        return out

    def activation(self) -> Any:
        """The activation as a callable: its module's ``forward`` when no hook watches it (a module call costs
        ~1.6 us more than the function, five times per layer at decoding), else the module itself."""
        act = self.act_fn
        if isinstance(act, nn.Module) and not (act._forward_hooks or act._forward_pre_hooks or _global_module_hooks()):
            return act.forward
        return act

    def expert(self, index: int, x: torch.Tensor, weights: dict[str, Any] | None = None) -> torch.Tensor:
        """One expert's FFN on the rows ``x`` routed to it (``weights``: ``fused_weight`` of each tensor, read
        once per forward by the caller)."""
        weights = weights or self.expert_weights()
        act = self.activation()
        if self.kind == "gated":
            projected = self._expert_linear(x, weights["gate_up_proj"], index)
            half = projected.shape[-1] // 2  # gate | up: two views, as ``chunk(2)`` makes them, in two ops instead of six
            return self._expert_linear(act(projected[..., :half]) * projected[..., half:], weights["down_proj"], index)
        hidden = act(self._expert_linear(x, weights["up_proj"], index, self.up_bias[index]))
        return self._expert_linear(hidden, weights["down_proj"], index, self.down_bias[index])

    def weight_names(self) -> tuple[str, str]:
        """The fused tensors in call order: the first projection, then ``down_proj``."""
        return ("gate_up_proj", "down_proj") if self.kind == "gated" else ("up_proj", "down_proj")

    def expert_weights(self, low_rank: dict[str, LowRankTerms] | None = None) -> dict[str, Any]:
        """Each fused tensor as ``fused_weight`` reads it, plus the ``low_rank`` terms the caller adds per name."""
        low_rank = low_rank or {}
        return {name: self.fused_weight(name, low_rank.get(name, ())) for name in self.weight_names()}

    def forward(self, hidden_states: torch.Tensor, selected: torch.Tensor, weights: torch.Tensor,
                low_rank: dict[str, LowRankTerms] | None = None) -> torch.Tensor:
        """``[N, H]`` tokens, their ``[N, k]`` experts and output weights -> ``[N, H]``; ``low_rank``: adapter terms
        ``W_e += s * lhs_e @ rhs_e`` per tensor name, applied to the routed rows (``peft_expert_lora``)."""
        tensors = self.expert_weights(low_rank)
        if hidden_states.shape[0] == 1:
            return self.one_token(hidden_states, selected[0], weights.reshape(-1), tensors)
        return self.dispatch(hidden_states, selected, weights, tensors)

    def dispatch(self, hidden_states: torch.Tensor, selected: torch.Tensor, weights: torch.Tensor,
                 tensors: dict[str, Any] | None = None) -> torch.Tensor:
        """Slots sorted by expert, one matmul per expert over its rows, each expert's weighted rows added back into
        the output as soon as they are computed (see the class doc).

        Adding expert by expert in ascending order adds a token's terms in the order one ``index_add_`` over all
        sorted slots would (same values, tests/test_runtime.py) without concatenating the ``[N*k, H]`` outputs first:
        with ``index_select`` for the gather, a carved layer's experts on 512 tokens at top-4 took 8.2 instead of
        10.3 ms (docs/ARCHITECTURE.md, "Runtime speed")."""
        top_k = selected.shape[-1]
        flat_experts = selected.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        token_of_slot = order // top_k
        grouped = hidden_states.index_select(0, token_of_slot)
        slot_weights = weights.reshape(-1)[order].unsqueeze(-1).to(hidden_states.dtype)
        tensors = tensors or self.expert_weights()
        out = torch.zeros_like(hidden_states)
        recorded = self.recorded_call(grouped, tensors, counts)
        if recorded is not None:
            spec, flat = recorded
            weighted = SortedExpertsFunction.apply(spec, grouped, *flat) * slot_weights
            return out.index_add_(0, token_of_slot, weighted)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            weighted = self.expert(expert, grouped[rows], tensors) * slot_weights[rows]
            out.index_add_(0, token_of_slot[rows], weighted.to(hidden_states.dtype))
            start += count
        return out

    def recorded_call(self, grouped: torch.Tensor, tensors: dict[str, Any],
                      counts: list[int]) -> tuple[SortedExpertsSpec, list[torch.Tensor]] | None:
        """``(spec, tensors)`` for ``SortedExpertsFunction`` when autograd records this call (a fine-tuning step:
        something upstream or in the experts trains) and every tensor has the rows' dtype; else ``None`` (then
        the per-expert loop runs: without autograd it has nothing to save)."""
        if not torch.is_grad_enabled():
            return None
        biases = (None, None) if self.kind == "gated" else (self.up_bias, self.down_bias)
        flat: list[torch.Tensor] = []
        layout: list[tuple[bool, list[float]]] = []
        for name, bias in zip(self.weight_names(), biases):
            base, terms = tensors[name]
            flat.append(base)
            if bias is not None:
                flat.append(bias)
            for lhs, rhs, _ in terms:
                flat += [lhs, rhs]
            layout.append((bias is not None, [scale for _, _, scale in terms]))
        if any(t.dtype != grouped.dtype for t in flat) or not (grouped.requires_grad or any(t.requires_grad for t in flat)):
            return None
        return SortedExpertsSpec(self, counts, layout), flat

    def one_token(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                  tensors: dict[str, Any] | None = None) -> torch.Tensor:
        """One token ``x [1, H]`` (a decoding step): its experts in ascending index order, each output times its
        weight, summed in that order — the products and additions the sorted dispatch makes for one row
        (bit-identical, tests/test_runtime.py), without its sort, gather, split, concatenation and scatter
        (~11 small ops, ~25 us per layer at SmolLM2 size)."""
        tensors = tensors or self.expert_weights()
        ids = experts.tolist()
        scales = weights.to(x.dtype).tolist()  # the weights' values in x's dtype, as Python floats: no per-slot select
        out = None
        for slot in sorted(range(len(ids)), key=ids.__getitem__):
            term = self.expert(ids[slot], x, tensors)
            if scales[slot] != 1.0:  # times 1 changes no bit: a carved expert's scale before fine-tuning
                term = term * scales[slot]
            out = term if out is None else out + term
        return out


# --------------------------------------------------------------------------------------------------------------
# 5. MoE block (replaces the FFN of a dense parent)
# --------------------------------------------------------------------------------------------------------------

#: Fewest tokens in a call for which the block computes its always-on part beside the router (thread hand-off
#: costs ~50 us; a GRU recurrence costs ~20 us per step).
OVERLAP_MIN_TOKENS = 64
_helper: tuple[int, ThreadPoolExecutor] | None = None  # (process id, one-thread pool), made on first use


def overlaps_recurrence(flat: torch.Tensor) -> bool:
    """Whether a block call on these rows computes its shared expert and estimate on a helper thread while the
    router runs ATen's GRU loop on one CPU thread (docs/ARCHITECTURE.md, "Runtime speed"): CPU, several
    threads, enough tokens, no autograd (the helper would not see the caller's graph), no autocast (a
    thread-local mode the helper would not share), and no compiled recurrence: that loop is ~10x shorter than
    ATen's, and a helper competing for the cores then costs more than it hides (a carve's 512-token forward:
    561 ms with the helper, 515 ms without)."""
    return (flat.device.type == "cpu" and flat.shape[0] >= OVERLAP_MIN_TOKENS and not torch.is_grad_enabled()
            and torch.get_num_threads() > 1 and not torch.is_autocast_enabled("cpu")
            and compiled_loops_for(flat) is None)


def run_beside(fn: Callable[..., Any], *args: Any) -> Future:
    """Start ``fn(*args)`` on the runtime's helper thread under the caller's no-grad / inference mode (both are
    thread-local). The pool is remade after a fork: a forked child inherits the pool object but not its thread."""
    global _helper
    if _helper is None or _helper[0] != os.getpid():
        _helper = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="spectra-beside"))
    inference = torch.is_inference_mode_enabled()

    def call() -> Any:
        with torch.inference_mode(inference), torch.no_grad():
            return fn(*args)

    return _helper[1].submit(call)


def ffn_shape(text_config: Any, knobs: dict[str, Any]) -> tuple[int, int, str, str]:
    """(hidden, per-expert intermediate, expert kind, activation) for a parent config."""
    hidden = text_config.hidden_size
    if text_config.model_type == "gpt2":
        parent_inter = text_config.n_inner or 4 * hidden
        act = knobs["hidden_act"] or text_config.activation_function
        kind = "mlp"
    else:
        parent_inter = text_config.intermediate_size
        act = knobs["hidden_act"] or text_config.hidden_act
        kind = knobs["expert_kind"]
    return hidden, int(knobs["intermediate_size"] or parent_inter), kind, act


class SkippedExpertsEstimate(nn.Module):
    """A low-rank linear estimate of what a carved block's UNSELECTED experts would have added.

    Why (docs/ARCHITECTURE.md, "Skipped-experts estimate"): a carved block drops the slices its router does not
    pick, and their sum is a large, partly predictable share of the FFN output. A rank-r linear map of the FFN
    input, fitted by reduced-rank ridge regression on the calibration text to that sum at the carve's ``top_k``
    (``fitted_top_k``), recovers much of it for ``2 r H`` multiply-adds per token (r = 64 on SmolLM2-135M: +2.8%
    of the parent FFN's). The block scales it by ``(E - k) / (E - fitted_top_k)`` -- the estimate per skipped
    expert times the number skipped -- so top-k = E adds nothing (all experts on = the parent) and another top-k
    gets a proportional share.
    """

    def __init__(self, hidden: int, rank: int, num_experts: int, fitted_top_k: int):
        super().__init__()
        self.in_weight = nn.Parameter(torch.empty(rank, hidden))  # [r, H]
        self.out_weight = nn.Parameter(torch.empty(hidden, rank))  # [H, r]
        self.out_bias = nn.Parameter(torch.empty(hidden))  # [H]: the mean of what is skipped
        self.num_experts, self.fitted_top_k = num_experts, fitted_top_k
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero: an estimate that was never fitted adds nothing."""
        with torch.no_grad():
            for param in (self.in_weight, self.out_weight, self.out_bias):
                param.zero_()

    def forward(self, flat: torch.Tensor, top_k: int) -> torch.Tensor | None:
        """``[N, H] -> [N, H]``, or ``None`` when every expert runs (nothing skipped)."""
        skipped = self.num_experts - top_k
        if skipped <= 0:
            return None
        estimate = _linear(_linear(flat, self.in_weight), self.out_weight, self.out_bias)
        share = skipped / (self.num_experts - self.fitted_top_k)
        return estimate if share == 1.0 else estimate * share


class SpectraMoeBlock(nn.Module):
    """SPECTRA-routed experts in place of a dense FFN: ``[B, T, H] -> [B, T, H]``.

    Two combine rules (``expert_combine``). ``softmax``: the selected experts' outputs are mixed with weights
    that sum to 1 — right for experts that are copies of one FFN. ``sum``: carved experts are disjoint slices of
    the parent's neurons, so the parent FFN is the shared expert PLUS every routed expert; the block computes
    ``shared(x) + sum_{e selected} expert_scale[e] * expert_e(x)`` (scale 1 everywhere and top-k = E give the
    parent's FFN exactly). A softmax mean of slices would shrink the output k-fold.
    """

    def __init__(self, text_config: Any, knobs: dict[str, Any], layer_idx: int, context: RoutingContext):
        super().__init__()
        hidden, inter, kind, act = ffn_shape(text_config, knobs)
        self.gate = SpectraRouter(hidden, knobs, layer_idx, context)
        self.experts = SpectraExperts(knobs["num_experts"], hidden, inter, kind, act)
        self.shared_expert = None
        if knobs["shared_expert"]:
            shared_inter = int(knobs["shared_intermediate_size"] or ffn_shape(text_config, {**knobs, "intermediate_size": None})[1])
            self.shared_expert = SpectraExperts(1, hidden, shared_inter, kind, act)
        self.expert_scale = None
        if knobs.get("expert_combine", "softmax") == "sum":
            self.expert_scale = nn.Parameter(torch.ones(knobs["num_experts"]))
        self.skipped_estimate = None
        if knobs.get("skipped_estimate_rank", 0):
            self.skipped_estimate = SkippedExpertsEstimate(hidden, knobs["skipped_estimate_rank"], knobs["num_experts"],
                                                           knobs["skipped_estimate_top_k"])
        self.dropout = nn.Dropout(getattr(text_config, "resid_pdrop", 0.0) or 0.0)

    def combine_weights(self, weights: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """Per-slot output weights: the router's softmax weights, or for ``sum`` the selected experts' scales.

        For ``sum`` the router weights still carry a straight-through term ``w - w.detach()`` (value 0), so the
        LM loss reaches the router when it is fine-tuned while the forward value stays ``expert_scale[e]``.
        """
        if self.expert_scale is None:
            return weights
        scale = self.expert_scale.index_select(0, selected.reshape(-1)).view_as(selected)
        if scale.dtype != weights.dtype:
            scale = scale.to(weights.dtype)
        if weights.requires_grad:
            scale = scale * (1.0 + weights - weights.detach())
        return scale

    def always_on(self, flat: torch.Tensor, top_k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What every token gets whatever its route: the shared expert's output (weight 1: no dispatch, the same
        values as routing all tokens to it) and the skipped-experts estimate for ``top_k`` selected experts."""
        shared = None
        if isinstance(self.shared_expert, SpectraExperts):
            shared = self.shared_expert.expert(0, flat)
        elif self.shared_expert is not None:  # wrapped (PEFT LoRA on its tensors): through the wrapper's forward
            every = torch.zeros(flat.shape[0], 1, dtype=torch.long, device=flat.device)
            shared = run_experts(self.shared_expert, flat, every, torch.ones(flat.shape[0], 1, dtype=flat.dtype,
                                                                                 device=flat.device))
        estimate = self.skipped_estimate(flat, top_k) if self.skipped_estimate is not None else None
        return shared, estimate

    def _compiled_parts(self) -> tuple[SpectraRouter, BlockStepTensors, tuple[float, float, float]] | None:
        """The router that runs, the block's tensors (``BlockStepTensors``) and the scales of the experts' LoRA
        factors and of the estimate, when its parts suit the compiled decoding step, else ``None``: a SPECTRA
        router with a GRU and a projector (also as PEFT's ``modules_to_save`` copy, ``peft_saved_module``), gated
        SiLU experts -- plain, or wrapped by PEFT's LoRA on their fused tensors in the plain case
        ``peft_expert_lora`` reads (one factor pair per tensor) -- a plain shared expert and estimate (a wrapped
        one, another activation or a gpt2-style expert runs the torch path), and no hook on any part (a hook must
        see its module called). Parts are read through the module dicts:
        ``nn.Module.__getattr__`` costs ~0.5 us a name. (``_compiled_step`` checks the tensors' dtype and layout
        when their storage changes.)"""
        modules = self._modules
        gate, experts = peft_saved_module(modules["gate"]), modules["experts"]
        shared, estimate = modules.get("shared_expert"), modules.get("skipped_estimate")  # absent parts: plain None
        if estimate is not None:
            estimate = peft_saved_module(estimate)
            if estimate is None:
                return None
        if type(gate) is not SpectraRouter or not gate.use_projector or not gate.use_gru:
            return None
        gru = gate._modules["gru"]
        if any(m is not None and (m._forward_hooks or m._forward_pre_hooks) for m in (gate, gru, experts, shared, estimate)):
            return None
        terms: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        if type(experts) is not SpectraExperts:
            unwrapped = peft_expert_lora(experts)
            if unwrapped is None or any(len(pairs) != 1 for pairs in unwrapped[1].values()):
                return None
            experts, terms = unwrapped
        for part in (experts, shared):
            if part is None:
                continue
            act = part._modules.get("act_fn")
            if (type(part) is not SpectraExperts or part.kind != "gated" or type(act) not in SILU_TYPES
                    or act._forward_hooks or act._forward_pre_hooks or "parametrizations" in part._modules):
                return None
        if estimate is not None and type(estimate) is not SkippedExpertsEstimate:
            return None
        g, r, e = gru._parameters, gate._parameters, experts._parameters
        mu, repulsion = gate.expert_geometry()
        first, second = terms.get("gate_up_proj", [(None, None, 0.0)])[0], terms.get("down_proj", [(None, None, 0.0)])[0]
        shared_params = shared._parameters if shared is not None else {}
        share = 0.0  # the estimate's multiple at this top-k (``SkippedExpertsEstimate.forward``); 0: nothing skipped
        est = {}
        if estimate is not None and estimate.num_experts > gate.top_k:
            est = estimate._parameters
            share = (estimate.num_experts - gate.top_k) / (estimate.num_experts - estimate.fitted_top_k)
        tensors = BlockStepTensors(
            w_ih=g["weight_ih_l0"], b_ih=g["bias_ih_l0"], w_hh=g["weight_hh_l0"], b_hh=g["bias_hh_l0"],
            projector=r["projector"], mu=mu, repulsion=repulsion, dual_bias=gate._buffers["dual_bias"],
            gate_up=e["gate_up_proj"], down=e["down_proj"], gate_up_lhs=first[0], gate_up_rhs=first[1],
            down_lhs=second[0], down_rhs=second[1], expert_scale=self._parameters.get("expert_scale"),
            shared_gate_up=shared_params.get("gate_up_proj"), shared_down=shared_params.get("down_proj"),
            estimate_in=est.get("in_weight"), estimate_out=est.get("out_weight"), estimate_bias=est.get("out_bias"))
        return gate, tensors, (first[2], second[2], share)

    def _compiled_step(self, token: torch.Tensor) -> torch.Tensor | None:
        """The block's output for one decoding token ``[..., H]`` (one row) through ``_gated_block_step`` (routing,
        experts, shared expert and estimate in one call), in the token's shape, or ``None`` when it does not apply:
        one float32 CPU token, no autograd or autocast, a plain decoding step of the router
        (``SpectraRouter._is_plain_step``), no global module hook, the parts of ``_compiled_parts``.

        Why (docs/ARCHITECTURE.md, "Runtime speed"): the torch path reads a carved block's 6.6 MB of weights in
        ~14 matrix-vector calls of 0.1-0.8 MB and ~80 small ops, ~460 us a layer per decoded token on the 2-core
        box against the parent MLP's ~310 us for 10.6 MB; one pass per stage over the same rows on both cores
        reads them at about the parent's bandwidth. Not the torch path's bits (other summation orders, router
        sums in float64): logits within float rounding, the same tokens (tests/test_runtime.py)."""
        kernel = compiled_block_step()
        if kernel is None or token.dtype != torch.float32 or not token.is_cpu or token.requires_grad \
                or torch.is_autocast_enabled("cpu") or _global_module_hooks():
            return None
        step = self._prepared_step()
        if step is None or not step.gate._is_plain_step(1):
            return None
        gate = step.gate
        states, state0 = gate._cached_state(1)
        state, out = torch.empty(1, step.state_width), torch.empty_like(token, memory_format=torch.contiguous_format)
        threads = torch.get_num_threads()  # the caller's setting, as for torch's kernels (numba keeps its own)
        global _block_pool_started
        try:
            # numpy views, not torch reshapes: each torch op costs several microseconds here (``PreparedBlockStep``)
            arguments = (token.numpy().reshape(-1), *step.before_state,
                         state0.numpy()[0] if state0 is not None else step.no_state, *step.after_state,
                         state.numpy()[0], out.numpy().reshape(-1))
            if _block_pool_started and numba.get_num_threads() == threads:
                kernel(*arguments)
            else:
                with torch_threads_kept():  # numba's pool starts at the first call (or compile): torch's count stays
                    if numba.get_num_threads() != threads:
                        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                    kernel(*arguments)
                _block_pool_started = True
        except Exception as error:  # noqa: BLE001 - e.g. a numba threading layer that cannot start on this machine
            global _compiled_block
            _compiled_block = None  # nothing was stored yet: this step and every later one take the torch path
            warnings.warn(f"SPECTRA: the compiled decoding step failed ({type(error).__name__}: {error}); decoding "
                          "with PyTorch ops from now on", RuntimeWarning, stacklevel=2)
            return None
        if states is not None:
            states[gate.layer_idx] = state
        return out

    def _prepared_step(self) -> PreparedBlockStep | None:
        """The kernel's arguments for this block's decoding step (``PreparedBlockStep``), or ``None`` when its
        parts do not suit the kernel. Kept between steps while ``PreparedBlockStep.still_fits`` holds: reading
        the parts afresh (``_compiled_parts``, ~40 small Python operations) cost ~60-100 us a layer per decoded
        token in situ -- the weights streamed by every layer push those Python objects out of the core's caches --
        a tenth of a carved model's decoding step (docs/ARCHITECTURE.md, "Runtime speed")."""
        step = self.__dict__.get("_prepared")
        if step is not None and step.still_fits():
            return step
        hook_id = RemovableHandle.next_id  # before the parts are read: a hook added meanwhile invalidates
        parts = self._compiled_parts()
        if parts is None:
            return None
        gate, tensors, scales = parts
        arrays = self._step_arrays(gate, tensors)
        if arrays is None:
            return None
        step = PreparedBlockStep.of(self, gate, arrays[0], arrays[1], scales, tensors, hook_id)
        self.__dict__["_prepared"] = step
        return step

    def _step_arrays(self, gate: SpectraRouter, tensors: BlockStepTensors
                     ) -> tuple[BlockStepTensors, tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
        """numpy views of the block's tensors for the kernel and its scratch arrays, cached by the tensors'
        storage (views: in-place edits show through them); ``None`` for tensors the kernel cannot read (another
        dtype or device, a layout it does not take)."""
        key = [t.data_ptr() if t is not None else 0 for t in tensors]
        d, experts, top_k = gate.router_dim, gate.num_experts, gate.top_k
        key += [d, experts, top_k]
        cached = self.__dict__.get("_step_array_cache")
        if cached is None or cached[0] != key:
            named = tensors._asdict()
            if any(t is not None and (t.dtype != torch.float32 or not t.is_cpu or min(t.stride()) < 0
                                      or (name not in LORA_FACTOR_FIELDS and not t.is_contiguous()))
                   for name, t in named.items()):
                self.__dict__["_step_array_cache"] = (key, None)  # these tensors: the torch path until they change
                return None
            absent = BlockStepTensors.absent_shapes(tensors.gate_up.shape[2], experts, tensors.down.shape[2])
            arrays = BlockStepTensors(**{name: (t.detach() if t is not None else torch.zeros(absent[name])).numpy()
                                         for name, t in named.items()})
            # the shared expert is expert 0 of its stack
            arrays = arrays._replace(shared_gate_up=arrays.shared_gate_up[0], shared_down=arrays.shared_down[0])
            scratch = (np.zeros(d + 2 * experts + 1, np.float32), np.empty(d + experts + top_k, np.float32),
                       np.empty(top_k, np.int64))  # zeros: the state before the first token (never written)
            cached = self.__dict__["_step_array_cache"] = (key, (arrays, scratch))
        return cached[1]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.numel() == hidden_states.shape[-1] and not torch.is_grad_enabled():  # one decoding token
            stepped = self._compiled_step(hidden_states)
            if stepped is not None:
                return stepped
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        expected_k = getattr(self.gate, "top_k", None)
        beside = None
        if expected_k is not None and (self.shared_expert is not None or self.skipped_estimate is not None) \
                and overlaps_recurrence(flat):
            beside = run_beside(self.always_on, flat, expected_k)
        _, weights, selected = self.gate(hidden_states)
        out = run_experts(self.experts, flat, selected, self.combine_weights(weights, selected))
        top_k = selected.shape[-1]  # any gate (validate's baselines too)
        parts = beside.result() if beside is not None else None
        if parts is None or top_k != expected_k:
            parts = self.always_on(flat, top_k)
        for part in parts:  # shared expert, then estimate: the order the sum has always had
            if part is not None:
                out = out + (part if part.dtype == out.dtype else part.to(out.dtype))
        out = out.reshape(shape)
        return self.dropout(out) if self.training and self.dropout.p > 0 else out  # identity otherwise: no call


# --------------------------------------------------------------------------------------------------------------
# 6. Cache
# --------------------------------------------------------------------------------------------------------------


class SpectraCache(DynamicCache):
    """A DynamicCache that also carries each layer's router GRU state (``spectra_router_states``).

    One decoding step then costs O(1) router work, and beam search reorders router states with the KV cache.
    Cropping is refused: a GRU state cannot be rewound (no assisted decoding).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.spectra_router_states: dict[int, torch.Tensor] = {}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for layer, state in self.spectra_router_states.items():
            self.spectra_router_states[layer] = state.index_select(0, beam_idx.to(state.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for layer, state in self.spectra_router_states.items():
            self.spectra_router_states[layer] = state.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        for layer, state in self.spectra_router_states.items():
            self.spectra_router_states[layer] = state[indices]

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("SPECTRA router states cannot be cropped (assisted decoding is unsupported)")


# --------------------------------------------------------------------------------------------------------------
# 7. The causal LM
# --------------------------------------------------------------------------------------------------------------


def decoder_layers(parent: PreTrainedModel) -> nn.ModuleList:
    """The parent's list of transformer blocks (``model.layers`` for llama-likes, ``transformer.h`` for gpt2)."""
    base = parent.base_model
    for name in ("layers", "h"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(parent).__name__}")


class SpectraPreTrainedModel(PreTrainedModel):
    config_class = SpectraConfig
    base_model_prefix = "spectra"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (SpectraRouter, SpectraExperts, SkippedExpertsEstimate)):
            module.reset_parameters()
        elif isinstance(module, SpectraMoeBlock):
            if module.expert_scale is not None:
                with torch.no_grad():
                    module.expert_scale.fill_(1.0)
        else:
            super()._init_weights(module)


class SpectraForCausalLM(SpectraPreTrainedModel, GenerationMixin):
    """The parent causal LM with SPECTRA routing in every FFN.

    The parent model class is built from ``config.text_config`` and its children are adopted as ours, so
    parameter names are the parent's (``model.layers.3.mlp.experts.gate_up_proj``, ``transformer.h.0.mlp...``)
    and transformers' own checkpoint conversions for the parent (e.g. legacy Mixtral expert names) apply.
    Dense parents get a ``SpectraMoeBlock`` at ``mlp``; MoE parents keep their experts and get a
    ``SpectraRouter`` at ``mlp.gate``.
    """

    def __init__(self, config: SpectraConfig):
        super().__init__(config)
        text_config = config.text_config
        parent = MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)](text_config)
        config.text_config = parent.config
        self.__dict__["parent"] = parent  # not a submodule: we own its children directly
        self.__dict__["routing_context"] = RoutingContext()
        self._tied_weights_keys = dict(getattr(parent, "_tied_weights_keys", None) or {})
        self._no_split_modules = list(getattr(parent, "_no_split_modules", None) or [])
        knobs = config.spectra
        for index, layer in enumerate(decoder_layers(parent)):
            if text_config.model_type in MOE_PARENTS:
                layer.mlp.gate = SpectraRouter(text_config.hidden_size, knobs, index, self.routing_context)
            else:
                layer.mlp = SpectraMoeBlock(text_config, knobs, index, self.routing_context)
        for name, child in parent.named_children():
            self.add_module(name, child)
        self._parent_accepts = set(inspect.signature(parent.forward).parameters)
        self.post_init()

    # -- accessors used by the tools ---------------------------------------------------------------------------

    def routers(self) -> list[SpectraRouter]:
        return [m for m in self.modules() if isinstance(m, SpectraRouter)]

    def _routers_to_share_with(self) -> list[SpectraRouter]:
        """``routers()``, cached while every decoder layer holds the same ``mlp`` and ``mlp.gate`` objects.

        Why: every forward re-points the routers at the shared routing context, and walking all modules for them
        took ~0.4 ms, ~1% of a decoding step; a wrapper that copies a router (PEFT's ``modules_to_save``) replaces
        ``mlp.gate``, which changes the key."""
        cached = self.__dict__.get("_router_cache")
        layers = cached[2] if cached is not None else decoder_layers(self.parent)
        mlps = [layer._modules.get("mlp") for layer in layers]  # _modules: plain dict lookups, not nn.Module.__getattr__
        key = tuple(id(m) for m in mlps) + tuple(id(m._modules.get("gate")) if m is not None else 0 for m in mlps)
        if cached is None or cached[0] != key:
            cached = (key, self.routers(), layers)
            self.__dict__["_router_cache"] = cached
        return cached[1]

    def get_input_embeddings(self) -> nn.Module:
        return self.parent.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.parent.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.parent.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.parent.set_output_embeddings(value)
        self.add_module("lm_head", value)

    # -- generation: swap the default cache for one that carries router states --------------------------------

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):  # type: ignore[override]
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if type(cache) is DynamicCache and cache.get_seq_length() == 0:
            model_kwargs["past_key_values"] = SpectraCache(config=self.config.get_text_config(decoder=True))
        return result

    # -- forward -----------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> MoeCausalLMOutputWithPast:
        text_config = self.config.text_config
        use_cache = use_cache if use_cache is not None else getattr(text_config, "use_cache", True)
        if use_cache and past_key_values is None:
            past_key_values = SpectraCache(config=text_config)
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, steps = reference.shape[0], reference.shape[1]
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -steps:].bool()
            if bool(token_mask.all()):
                token_mask = None
        # transformers' MoE convention: the router aux loss (and the per-router records it is computed from)
        # only when asked for; with labels alone ``loss`` is the LM loss.
        if output_router_logits is None:
            output_router_logits = bool(getattr(self.config, "output_router_logits", False))
        want_records = bool(output_router_logits)

        ctx = self.routing_context
        for router in self._routers_to_share_with():  # wrappers such as PEFT modules_to_save deep-copy routers
            router.__dict__["context"] = ctx
        ctx.batch_shape, ctx.token_mask = (batch, steps), token_mask
        ctx.cache = past_key_values if use_cache else None
        ctx.records = [] if want_records else None
        parent_kwargs = {k: v for k, v in kwargs.items() if k in self._parent_accepts or "kwargs" in self._parent_accepts}
        if "output_router_logits" in self._parent_accepts:
            parent_kwargs["output_router_logits"] = False
        try:
            out = self.parent(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values if use_cache else None, inputs_embeds=inputs_embeds,
                labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep, **parent_kwargs,
            )
            records = ctx.records or []
        finally:
            ctx.reset()

        loss, aux_loss = out.loss, None
        if records:
            aux_loss = self.router_aux_loss(records)
            if loss is not None:
                loss = loss + self.config.spectra["router_aux_loss_coef"] * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=out.logits,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
            router_logits=tuple(r["logits"] for r in records) if output_router_logits else None,
        )

    def router_aux_loss(self, records: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Router entropy (coef ``router_entropy_coef``) + projector orthogonality (coef ``ortho_loss_coef``).

        Returned as ``aux_loss`` with ``output_router_logits=True``; ``loss`` then adds it times
        ``router_aux_loss_coef`` when labels are given, as in transformers' Mixtral."""
        knobs = self.config.spectra
        entropy = torch.stack([routing_entropy(r["scores"], knobs["temperature"], r["mask"]) for r in records]).mean()
        ortho = torch.stack([router.orthogonality_loss() for router in self.routers()]).mean()
        return knobs["router_entropy_coef"] * entropy + knobs["ortho_loss_coef"] * ortho


SpectraConfig.register_for_auto_class()
SpectraForCausalLM.register_for_auto_class("AutoModelForCausalLM")
