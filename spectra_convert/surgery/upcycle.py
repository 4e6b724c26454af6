"""Upcycling: a dense causal LM -> a SPECTRA mixture-of-experts model, calibrated before any training.

Flow (docs/ARCHITECTURE.md, "Conversions"):
1. read the layer count and FFN shapes from ``config.json`` or the GGUF metadata (``dense_ffn``, no
   transformers yet); when the FFN weights can be read straight from the files too, a background thread
   (``ExpertBuilder``) starts building every layer's experts (``copy`` + noise drawn ahead by ``NoiseAhead``, or
   ``drop``) and queueing them on the shard writer (``O_DIRECT``, ``direct_io``), one layer at a time;
2. meanwhile the main thread imports transformers, loads the dense parent (GGUF is dequantised by
   transformers) and its tokenizer (and starts the builder from the loaded model if step 1 could not), and
   hands the parent's non-FFN tensors to the builder to write after the experts;
3. one forward over calibration text captures every layer's FFN input (the router's input); each router's
   prototypes are initialised and its dual bias calibrated on hard top-k loads;
4. once the builder is done: the routers, then config (auto_map), runtime files, tokenizer, generation config,
   model card — all in a temp folder renamed into place at the end.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..console import human_bytes, progress, summary_table
from ..router.loads import calibration_cv_row
from ..dtypes import dtype_name, torch_dtype
from ..errors import UserError
from ..modelcard import write_model_card
from ..modelio.adapters import adapter_for
from ..modelio.checkpoint import ShardWriter
from ..modelio.config import read_parent_config
from ..modelio.dense_ffn import config_from_files, ffn_getter
from ..modelio.gguf_once import GgufParses
from ..modelio.outdir import atomic_output_dir, check_free_space
from ..modelio.parent import load_dense_parent
from ..modelio.resolve import resolve_model_dir
from ..modelio.side_files import write_runtime_files, write_spectra_config
from .moe_output import (SHARD_BYTES, UpcycleResult, build_spectra_config, capture_ffn_inputs,
                         router_param_count, write_generation_config)
from .noise import NoiseAhead, lower_thread_priority

METHODS = ("copy", "drop", "carve")
#: the router inits (``router.calibrate.INIT_METHODS``) that need no parent gate
ROUTER_INITS = ("orthogonal", "kmeans")


# -- building experts ----------------------------------------------------------------------------------------


def _noisy(stacked: torch.Tensor, noise: float, drawn: torch.Tensor | None, reference: torch.Tensor) -> torch.Tensor:
    """``stacked`` (``[E, ...]``, or one tensor broadcast to ``[E, ...]`` by ``_copies``) plus Gaussian noise of
    ``noise`` x the std of ``reference``; ``drawn`` holds that many standard normals, drawn ahead by
    ``NoiseAhead``, and becomes the result: one fused pass ``stacked + std * drawn`` written over ``drawn`` (a
    separate ``mul_`` then ``add_`` read and wrote every expert byte twice: ~1 core-second per 10 GB of output)."""
    if noise == 0.0 or drawn is None:
        return stacked.contiguous()
    std = float(reference.float().std()) * noise
    drawn = drawn.view(stacked.shape)
    if stacked.dtype != drawn.dtype:  # e.g. a bf16 parent: noise in its dtype, as the experts are
        return drawn.to(stacked.dtype).mul_(std).add_(stacked)
    return torch.add(stacked, drawn, alpha=std, out=drawn)


def noise_sizes(shapes: dict[str, tuple[int, ...]], experts: int, method: str) -> dict[str, int]:
    """Element counts of the noise each noisy expert tensor needs (biases get none): ``copy`` and ``drop`` stack
    E full copies (``carve`` adds no noise and never asks)."""
    return {name: experts * math.prod(shape) for name, shape in shapes.items() if not name.endswith("bias")}


def expert_bytes(shapes: dict[str, tuple[int, ...]], layers: int, experts: int, method: str, dtype: torch.dtype) -> int:
    """Bytes of every layer's expert tensors in the output: the lower bound of its size checked against free
    disk space before anything is written (E copies of the FFN; a partition of its neurons holds it once)."""
    copies = experts if method != "carve" else 1
    return layers * copies * sum(math.prod(shape) for shape in shapes.values()) * torch.empty((), dtype=dtype).element_size()


def _copies(tensor: torch.Tensor, experts: int) -> torch.Tensor:
    """``[E, ...]`` view of ``experts`` copies of ``tensor`` (no memory until ``_noisy`` materialises it)."""
    return tensor.unsqueeze(0).expand(experts, *tensor.shape)


def drop_neurons(stacked: dict[str, torch.Tensor], ratio: float, generator: torch.Generator) -> None:
    """Drop-Upcycling (Nakamura et al., ICLR 2025), in place on ``[E, ...]`` copies: each expert re-initialises a
    different random ``ratio`` of its intermediate neurons -- gate/up rows and down columns together -- from a
    normal with the mean and std of the weights being replaced, so copies start diverse instead of identical."""
    first = stacked["gate_up"] if "gate_up" in stacked else stacked["up"]
    experts = first.shape[0]
    inter = first.shape[1] // 2 if "gate_up" in stacked else first.shape[1]
    count = round(inter * ratio)
    if count == 0:
        return
    for e in range(experts):
        neurons = torch.randperm(inter, generator=generator)[:count]
        if "gate_up" in stacked:
            rows = {"gate_up": torch.cat([neurons, neurons + inter])}
        else:
            rows = {"up": neurons, "up_bias": neurons}
        for name, index in rows.items():
            old = stacked[name][e]
            fresh = torch.randn((index.numel(), *old.shape[1:]), generator=generator, dtype=torch.float32)
            old[index] = (fresh * old.float().std() + old.float().mean()).to(old.dtype)
        down = stacked["down"][e]
        fresh = torch.randn((down.shape[0], count), generator=generator, dtype=torch.float32)
        down[:, neurons] = (fresh * down.float().std() + down.float().mean()).to(down.dtype)


def build_experts(dense: dict[str, torch.Tensor], experts: int, method: str, noise: float, drop_ratio: float,
                  generator: torch.Generator, drawn: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Fused expert tensors (SpectraExperts layout) from one dense FFN: ``copy`` (+ noise) or ``drop`` (copies with
    a different random ``drop_ratio`` of each expert's neurons re-initialised). ``drawn``: standard normals per
    noisy tensor (``noise_sizes``), required when ``noise > 0``; ``generator`` draws the dropped neurons."""
    drawn = drawn or {}
    if noise and set(drawn) != set(noise_sizes({n: t.shape for n, t in dense.items()}, experts, method)):
        raise ValueError(f"noise was drawn for {sorted(drawn)}, the experts need it for the non-bias tensors")
    if method not in ("copy", "drop"):
        raise ValueError(f"build_experts builds copy or drop experts, not {method!r} (carve: surgery.carve)")
    built = {name: _noisy(_copies(tensor, experts), noise, drawn.get(name), reference=tensor)
             for name, tensor in dense.items()}
    if method == "drop":
        drop_neurons(built, drop_ratio, generator)
    return built


_EXPERT_PARAM = {"gate_up": "gate_up_proj", "down": "down_proj", "up": "up_proj", "up_bias": "up_bias",
                 "down_bias": "down_bias"}


def _router_block(spectra_config: Any, layer: int, context: Any) -> Any:
    """Layer ``layer``'s MoE block with a materialised router (and shared expert, if configured) and its
    experts left on the meta device: the experts are built and written by ``ExpertBuilder``, and randomly
    initialising E experts only to drop them cost as much as building them (2.6 s of normal_ on SmolLM2 8x)."""
    from ..modeling.modeling_spectra import SpectraMoeBlock, SpectraRouter

    knobs = spectra_config.spectra
    with torch.device("meta"):
        block = SpectraMoeBlock(spectra_config.text_config, knobs, layer, context)
    block.gate = SpectraRouter(spectra_config.text_config.hidden_size, knobs, layer, context)
    if block.shared_expert is not None:
        block.shared_expert.to_empty(device="cpu")
        block.shared_expert.reset_parameters()
    return block


def calibrate_routers(spectra_config: Any, ffn_inputs: dict[int, torch.Tensor], router_init: str, seed: int,
                      bar: Any) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """Every layer's router initialised and bias-calibrated on its captured FFN inputs (consumed as it goes).
    Returns each layer's block tensors other than the experts (router, shared expert) and its calibration CV."""
    from ..modeling.modeling_spectra import RoutingContext
    from ..router.calibrate import calibrate_bias
    from ..router.prototypes import init_router

    context = RoutingContext()
    states: list[dict[str, torch.Tensor]] = []
    layer_cv: list[float] = []
    task = bar.add_task("calibrating routers", total=len(ffn_inputs))
    for i in sorted(ffn_inputs):
        block = _router_block(spectra_config, i, context)
        inputs = ffn_inputs.pop(i)
        init_router(block.gate, inputs, init=router_init, seed=seed + i)
        layer_cv.append(calibrate_bias(block.gate, inputs))
        states.append({name: t for name, t in block.state_dict().items() if not name.startswith("experts.")})
        bar.advance(task)
    return states, layer_cv


class ExpertBuilder:
    """Builds every layer's experts on one background thread and adds them to ``writer``, in layer order.

    ``start(get)`` begins, ``get`` mapping the parent's module keys to its FFN tensors (read from the checkpoint
    files, or the loaded model's state dict); ``then_add(tensors)`` (once, before ``wait``) hands over the
    parent's other tensors, which the thread queues after the experts — so they are written while the main
    thread still calibrates routers, not after. ``wait()`` returns once all of them are queued on the writer and
    re-raises a failure of the thread. The caller must not use ``writer`` in between. Leaving the ``with``
    block early (an exception) stops the thread after its current tensor and waits for it."""

    def __init__(self, writer: Any, drawn: NoiseAhead, noise_names: list[str], adapter: Any, ffn_prefixes: list[str],
                 *, experts: int, method: str, noise: float, drop_ratio: float, seed: int, out_dtype: torch.dtype,
                 bar: Any) -> None:
        self.writer, self.drawn, self.noise_names = writer, drawn, noise_names
        self.adapter, self.ffn_prefixes = adapter, ffn_prefixes
        self.experts, self.method, self.noise, self.drop_ratio = experts, method, noise, drop_ratio
        self.generator = torch.Generator().manual_seed(seed)  # draws the dropped neurons (the noise is drawn ahead)
        self.out_dtype, self.bar = out_dtype, bar
        self._stop = threading.Event()
        self._tail: queue.Queue[dict[str, torch.Tensor] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, get: Callable[[str], torch.Tensor]) -> None:
        self._thread = threading.Thread(target=self._run, args=(get,), name="spectra-expert-builder", daemon=True)
        self._thread.start()

    def _run(self, get: Callable[[str], torch.Tensor]) -> None:
        lower_thread_priority()
        try:
            task = self.bar.add_task("building experts", total=len(self.ffn_prefixes))
            for i, prefix in enumerate(self.ffn_prefixes):
                if self._stop.is_set():
                    return
                drawn = dict(zip(self.noise_names, self.drawn.take(i)))
                built = build_experts(self.adapter.ffn_tensors(get, i), self.experts, self.method, self.noise,
                                      self.drop_ratio, self.generator, drawn)
                for name, tensor in built.items():
                    if self._stop.is_set():
                        return
                    tensor = tensor.to(self.out_dtype)
                    buffer = drawn.pop(name, None)  # the noise buffer: the expert tensor itself when fp32
                    recycle = None
                    if buffer is not None:
                        if tensor.data_ptr() == buffer.data_ptr():
                            recycle = lambda _, buffer=buffer: self.drawn.recycle(buffer)  # noqa: E731
                        else:  # the output is a converted copy: the buffer is free now
                            self.drawn.recycle(buffer)
                    self.writer.add(f"{prefix}experts.{_EXPERT_PARAM[name]}", tensor, on_written=recycle)
                del built, drawn, tensor
                self.bar.advance(task)
            tail = self._tail.get()  # None: the caller is leaving early
            for name, tensor in (tail or {}).items():
                if self._stop.is_set():
                    return
                self.writer.add(name, tensor.to(self.out_dtype))
        except BaseException as exc:  # handed to the main thread by wait()
            self._error = exc

    def then_add(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tail.put(dict(tensors))

    def wait(self) -> None:
        if self._thread is None:
            raise RuntimeError("ExpertBuilder.wait() before start()")
        self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> ExpertBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._tail.put(None)  # wakes a thread waiting for tensors that will not come
        if self._thread is not None:
            self._thread.join()


def _check_same_layout(adapter: Any, files_config: Any, parent_config: Any) -> None:
    """The layout the builder started from (``config_from_files``) must be the one transformers loads."""
    loaded = adapter_for(parent_config)
    if (loaded.layer_prefix, loaded.expert_kind, loaded.projections) != (adapter.layer_prefix, adapter.expert_kind, adapter.projections) \
            or adapter.num_layers(files_config) != adapter.num_layers(parent_config) \
            or adapter.ffn_shapes(files_config) != adapter.ffn_shapes(parent_config):
        raise UserError(f"the parent's files describe {adapter.num_layers(files_config)} layers with FFN shapes "
                        f"{adapter.ffn_shapes(files_config)}, but transformers builds {adapter.num_layers(parent_config)} "
                        f"with {adapter.ffn_shapes(parent_config)}; check its config.json")


def noise_workers(cores: int) -> int:
    """Threads drawing expert noise on ``cores`` CPU threads: three quarters of them, at least two (measured on
    2 cores: two workers beat one by 0.5 s). They run at the lowest priority (``lower_thread_priority``), so
    they take what the main thread's capture forward and router fitting leave idle rather than stalling those
    ops' OpenMP regions (sharing the cores at equal priority made router fitting 2.3 s -> 7.6 s)."""
    return max(2, cores - cores // 4)


# -- the verb -------------------------------------------------------------------------------------------------

#: Router width of ``copy`` and ``drop`` upcycles. 64, not 128 (the default until 2026-12-07, eighteenth session):
#: the GRU recurrence is most of what a copy's prefill spends above Mixtral's, and at 64 a SmolLM2-135M 8x
#: top-2 copy ran its 512-token forward 7.3% faster (1.73x the parent against 1.87x at 128, side by side) with
#: unseen-domain balance still inside the goal (load CV mean / worst 0.040 / 0.068 against 0.034 / 0.053; at 32:
#: 0.049 / 0.090, too close to the 0.05 / 0.10 goal). README "Benchmarks".
COPY_ROUTER_DIM = 64


def upcycle(
    model: str,
    out: str | Path,
    *,
    experts: int = 8,
    top_k: int = 2,
    method: str = "copy",
    noise: float = 0.01,
    drop_ratio: float = 0.5,
    shared_fraction: float | None = None,
    carve_grouping: str = "coactivation",
    carve_refit: str = "none",
    router_steps: int | None = None,
    skipped_estimate_rank: int | None = None,
    carve_bias: str | None = None,
    router_dim: int | None = None,
    router_init: str = "orthogonal",
    calibration: str | Path | None = None,
    calibration_tokens: int | None = None,
    dtype: str | None = None,
    gguf_file: str | None = None,
    seed: int = 0,
    force: bool = False,
    spectra_overrides: dict | None = None,
) -> UpcycleResult:
    """Convert the dense causal LM ``model`` (folder or Hub id) into a calibrated SPECTRA MoE folder ``out``.

    ``method``: ``copy`` (E copies + ``noise``), ``drop`` (copies with ``drop_ratio`` of each expert's neurons
    re-initialised, for continued pre-training) or ``carve`` (a cheaper MoE of the parent's own neurons:
    ``shared_fraction``, ``carve_grouping``, ``carve_refit``, ``router_steps`` (default ``oracle_fit.ROUTER_STEPS``, 0:
    the ridge fit alone), ``skipped_estimate_rank`` (default
    ``SKIPPED_ESTIMATE_RANK``, 0 = none), ``carve_bias`` (default ``CARVE_BIAS``: "balance"; or "recall"); see
    ``carve_upcycle``).

    ``router_dim``: the router's GRU / expression width; default ``COPY_ROUTER_DIM`` (64) for ``copy`` and ``drop``,
    and 32 for ``carve`` (``CARVE_ROUTER_DIM``).
    ``calibration_tokens``: default 8192, and 32768 for ``carve`` (``CARVE_CALIBRATION_TOKENS``).

    ``spectra_overrides`` sets other routing knobs of the output (``SPECTRA_DEFAULTS``), e.g. ``{"use_gru":
    False}`` for an ablation: knobs that change parameter shapes (use_gru, use_projector) must be chosen at
    conversion time, and the bias is calibrated with the knobs the model will route with.

    Steps: plan (checks and shapes, before transformers is imported), build (experts, on a background thread
    from the start), load (the dense parent), calibrate (routers on the parent's FFN inputs), write (routers,
    index, config, runtime, tokenizer, model card) — all into a temp folder renamed into place at the end.
    """
    _check_options(method=method, drop_ratio=drop_ratio, experts=experts, top_k=top_k, router_init=router_init,
                   noise=noise, dtype=dtype)
    plan = _plan(model, gguf_file, calibration, experts=experts, method=method, noise=noise,
                 overrides=check_overrides(spectra_overrides), out_dtype=torch_dtype(dtype) if dtype else torch.float32)
    out = Path(out)
    check_free_space(out, expert_bytes(plan.adapter.ffn_shapes(plan.shape_config), plan.num_layers, experts, method,
                                       plan.out_dtype))
    if method == "carve":  # experts need the calibration activations: no early builder, no noise
        from .carve_upcycle import (CARVE_CALIBRATION_TOKENS, CARVE_ROUTER_DIM, SHARED_FRACTION, CarveOptions,
                                    carve_upcycle, check_calibration_size)

        router_dim = CARVE_ROUTER_DIM if router_dim is None else router_dim
        calibration_tokens = CARVE_CALIBRATION_TOKENS if calibration_tokens is None else calibration_tokens
        check_calibration_size(calibration_tokens)

        options = CarveOptions(shared_fraction=SHARED_FRACTION if shared_fraction is None else shared_fraction,
                               grouping=carve_grouping, refit=carve_refit)
        if router_steps is not None:
            options.router_steps = router_steps
        if skipped_estimate_rank is not None:
            options.skipped_rank = skipped_estimate_rank
        if carve_bias is not None:
            options.bias_rule = carve_bias
        return carve_upcycle(model, out, model_dir=plan.model_dir, adapter=plan.adapter, texts=plan.texts,
                             experts=experts, top_k=top_k, router_dim=router_dim, options=options,
                             calibration_tokens=calibration_tokens, out_dtype=plan.out_dtype, gguf_file=gguf_file,
                             seed=seed, force=force, overrides=plan.overrides)
    router_dim = COPY_ROUTER_DIM if router_dim is None else router_dim
    calibration_tokens = 8192 if calibration_tokens is None else calibration_tokens
    # Refuse a bad OUT before the expensive work, then hold the temp dir for the whole write. Tensors are streamed
    # into their shard files by a background thread (bounded queue: at most one tensor waits).
    with atomic_output_dir(out, force=force, inputs=[plan.model_dir], durable=True) as tmp:
        with NoiseAhead([list(plan.noise_sizes.values())] * plan.num_layers, seed,
                        workers=noise_workers(torch.get_num_threads())) as drawn_noise, \
                ShardWriter(tmp, max_shard_bytes=SHARD_BYTES, background=True, max_queued_shards=1,
                            streamed=True) as writer, \
                progress() as bar, \
                ExpertBuilder(writer, drawn_noise, list(plan.noise_sizes), plan.adapter, plan.ffn_prefixes,
                              experts=experts, method=method, noise=noise, drop_ratio=drop_ratio, seed=seed,
                              out_dtype=plan.out_dtype, bar=bar) as builder:
            parent = _load_parent(plan, builder, seed, experts=experts, top_k=top_k, router_dim=router_dim,
                                  method=method)
            router_states, layer_cv = _calibrate(plan, parent, router_init, calibration_tokens, seed, bar)
            builder.wait()  # every expert and non-FFN tensor is queued; the writer is ours again
            _write_routers(writer, plan, router_states, bar)
        _write_files(tmp, parent, model)
        total, active = _param_counts(plan, parent, experts=experts, top_k=top_k, method=method)
        output_bytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    result = UpcycleResult(out, experts, top_k, plan.num_layers, total, active, output_bytes, layer_cv)
    _print_summary(model, out, method, result)
    return result


def _check_options(*, method: str, drop_ratio: float, experts: int, top_k: int, router_init: str, noise: float,
                   dtype: str | None) -> None:
    """Argument checks: one line naming the option, before anything is read."""
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0.0 <= drop_ratio <= 1.0:
        raise UserError(f"--drop-ratio must be in [0, 1], got {drop_ratio}")
    if experts < 2:
        raise UserError(f"--experts must be at least 2, got {experts}")
    if not 1 <= top_k <= experts:
        raise UserError(f"--top-k ({top_k}) must be between 1 and --experts ({experts})")
    if router_init not in ROUTER_INITS:
        raise UserError(f"--router-init must be one of {', '.join(ROUTER_INITS)} for upcycle, got {router_init!r}")
    if noise < 0:
        raise UserError(f"--noise must be >= 0, got {noise}")
    if dtype is not None:
        dtype_name(dtype)  # one-line UserError for an unknown spelling


@dataclass
class _Plan:
    """What upcycle knows before transformers is imported: the parent's folder, its layout and FFN shapes
    (from ``config.json`` or the GGUF metadata when they say enough, else from transformers' config), the
    noise each layer's experts need, the calibration texts and the output dtype."""

    model_dir: Path
    gguf_file: str | None
    gguf_parses: GgufParses  # config now, FFN weights, tokenizer + model later: one parse of a GGUF file
    shape_config: Any
    parent_config: Any  # None until transformers has read it (see ``_load_parent``)
    adapter: Any
    num_layers: int
    ffn_prefixes: list[str]
    noise_sizes: dict[str, int]
    texts: list[str]
    overrides: dict
    out_dtype: torch.dtype


def _plan(model: str, gguf_file: str | None, calibration: str | Path | None, *, experts: int, method: str,
          noise: float, overrides: dict, out_dtype: torch.dtype) -> _Plan:
    from ..textdata import default_calibration_path, load_texts

    model_dir = resolve_model_dir(model)
    if gguf_file and not (model_dir / gguf_file).is_file():
        raise UserError(f"--gguf-file {gguf_file!r} not found in {model_dir}")
    gguf_parses = GgufParses()
    # The experts' shapes come from the files when they say enough: the noise workers and the expert builder
    # then start before transformers is imported. Otherwise transformers' config (with class defaults) decides.
    with gguf_parses.active():
        shape_config = config_from_files(model_dir, gguf_file)
        parent_config = None if shape_config is not None else read_parent_config(model_dir, gguf_file=gguf_file)
    shape_config = shape_config or parent_config
    adapter = adapter_for(shape_config)
    if adapter.is_moe:
        raise UserError(
            f"{model} is a mixture-of-experts model ({shape_config.model_type}); "
            "use `spectra-convert reroute` to keep its experts and replace the gates"
        )
    texts = [r.text for r in load_texts(calibration or default_calibration_path())]
    num_layers = adapter.num_layers(shape_config)
    # The experts' noise depends only on shapes: worker threads draw it ahead of use (a few layers, never all).
    sizes = noise_sizes(adapter.ffn_shapes(shape_config), experts, method) if noise else {}
    return _Plan(model_dir, gguf_file, gguf_parses, shape_config, parent_config, adapter, num_layers,
                 [adapter.mlp_prefix(i) for i in range(num_layers)], sizes, texts, overrides, out_dtype)


@dataclass
class _Parent:
    """The loaded dense parent and what is derived from it: tokenizer, the output's config, its non-FFN tensors."""

    model: Any
    tokenizer: Any
    spectra_config: Any
    non_ffn: dict[str, torch.Tensor]


def _load_parent(plan: _Plan, builder: ExpertBuilder, seed: int, *, experts: int, top_k: int, router_dim: int,
                 method: str) -> _Parent:
    """Start the expert builder (from the checkpoint files when they can be read directly, so experts are built
    and written while transformers imports, the parent loads and the routers calibrate), load the parent, and
    hand its non-FFN tensors to the builder to write after the experts."""
    with plan.gguf_parses.active():
        early = ffn_getter(plan.model_dir, plan.gguf_file, plan.adapter)
    loaded: dict[str, torch.Tensor] = {}  # the parent's state dict, once loaded
    if early is not None:
        # Layers not built by the time the parent is loaded take their FFNs from it (equal values,
        # tested): a GGUF parent is then dequantised once for them, not twice.
        builder.start(lambda key: loaded[key] if key in loaded else early(key))
    if plan.parent_config is None:
        with plan.gguf_parses.active():
            plan.parent_config = read_parent_config(plan.model_dir, gguf_file=plan.gguf_file)
        _check_same_layout(plan.adapter, plan.shape_config, plan.parent_config)
    torch.manual_seed(seed)
    with plan.gguf_parses.active():
        dense, tokenizer = load_dense_parent(plan.model_dir, plan.gguf_file, torch.float32, config=plan.parent_config)
    dense_state = dense.state_dict()
    loaded.update(dense_state)
    if early is None:
        builder.start(dense_state.__getitem__)
    knobs = {"sequence_balance": COPY_SEQUENCE_BALANCE, **plan.overrides}
    spectra_config = build_spectra_config(dense.config, plan.adapter, knobs, experts=experts, top_k=top_k,
                                     router_dim=router_dim, method=method, out_dtype=plan.out_dtype)
    tied = set(getattr(dense, "_tied_weights_keys", None) or {}) if spectra_config.tie_word_embeddings else set()
    non_ffn = {name: tensor for name, tensor in dense_state.items()
               if not any(name.startswith(p) for p in plan.ffn_prefixes) and name not in tied}
    builder.then_add(non_ffn)
    return _Parent(dense, tokenizer, spectra_config, non_ffn)


def _calibrate(plan: _Plan, parent: _Parent, router_init: str, calibration_tokens: int, seed: int,
               bar: Any) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """One forward over calibration text captures every layer's FFN input; each router is then fitted on it."""
    from ..modeling.modeling_spectra import decoder_layers
    from ..router.calibrate import calibration_batches

    try:
        blocks = calibration_batches(parent.tokenizer, plan.texts, max_tokens=calibration_tokens, seed=seed)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    ffn_inputs = capture_ffn_inputs(parent.model, decoder_layers(parent.model), blocks)
    return calibrate_routers(parent.spectra_config, ffn_inputs, router_init, seed, bar)


def _write_routers(writer: ShardWriter, plan: _Plan, router_states: list[dict[str, torch.Tensor]], bar: Any) -> None:
    """Each layer's router (and shared expert) tensors, then the last shards and the index."""
    for prefix, state in zip(plan.ffn_prefixes, router_states):
        for name, tensor in state.items():
            writer.add(prefix + name, tensor.to(plan.out_dtype))
    write_task = bar.add_task("writing shards", total=None)
    writer.close(on_progress=lambda done, total: bar.update(write_task, completed=done, total=total))


def _write_files(tmp: Path, parent: _Parent, model: str) -> None:
    """Everything in the output folder besides the weights."""
    write_spectra_config(tmp, parent.spectra_config)
    write_runtime_files(tmp)
    parent.tokenizer.save_pretrained(tmp)
    write_generation_config(parent.model, tmp)
    write_model_card(tmp, base_model=str(model))


def _param_counts(plan: _Plan, parent: _Parent, *, experts: int, top_k: int, method: str) -> tuple[int, int]:
    """(total, active per token) parameters of the output: only top-k of E experts run for a token."""
    expert_params = sum(math.prod(shape) for shape in plan.adapter.ffn_shapes(plan.parent_config).values())
    non_ffn_params = sum(t.numel() for t in parent.non_ffn.values())
    router_params = router_param_count(parent.spectra_config)
    total = non_ffn_params + plan.num_layers * (experts * expert_params + router_params)
    active = non_ffn_params + plan.num_layers * (top_k * expert_params + router_params)
    return total, active


def _print_summary(model: str, out: Path, method: str, result: UpcycleResult) -> None:
    layer_cv = result.layer_cv
    summary_table(
        f"upcycled {model} -> {out}",
        ["", "value"],
        [["experts / top-k", f"{result.experts} / {result.top_k}"], ["method", method], ["MoE layers", result.layers],
         ["params total", f"{result.params_total / 1e6:.1f}M"],
         ["params active per token", f"{result.params_active / 1e6:.1f}M"],
         ["output size", human_bytes(result.output_bytes)],
         calibration_cv_row(layer_cv)],
    )


#: Knobs that upcycle sets from its own arguments or the parent; an override of them would be ambiguous.
_OWN_KNOBS = {"num_experts": "experts", "top_k": "top_k", "router_dim": "router_dim", "expert_kind": None,
              "source": None}


#: ``sequence_balance`` that copy and drop upcycles write (the runtime default, 1, stays for rerouted MoEs, whose
#: experts differ). Copied experts make the output independent of the choice, so balance is all routing
#: decides: measured on SmolLM2 8x top-2, mixed domains incl. unseen (bench/balance.py, docs/CARVING.md), load
#: CV mean / worst layer 0.052 / 0.082 at 1 and 0.034 / 0.054 at 2, perplexity unchanged.
COPY_SEQUENCE_BALANCE = 2.0


def check_overrides(overrides: dict | None) -> dict:
    """Unknown or argument-owned knobs fail before the (slow) model load, with one line naming the field."""
    if overrides is None:  # before the import: it pulls in transformers, which the expert builder need not wait for
        return {}
    from ..modeling.configuration_spectra import SPECTRA_DEFAULTS

    if not isinstance(overrides, dict):
        raise UserError(f"spectra overrides must be a mapping of knob -> value, got {type(overrides).__name__}")
    for name in overrides:
        if name not in SPECTRA_DEFAULTS:
            raise UserError(f"spectra.{name}: unknown field; allowed fields: {', '.join(SPECTRA_DEFAULTS)}")
        if name in _OWN_KNOBS:
            arg = _OWN_KNOBS[name]
            hint = f"use the {arg!r} argument" if arg else "it is set from the parent architecture"
            raise UserError(f"spectra.{name} cannot be overridden in upcycle ({hint})")
    from ..modeling.configuration_spectra import _validate_spectra

    try:  # the values too, before any work (a recipe's dry run calls this)
        _validate_spectra({**SPECTRA_DEFAULTS, **overrides}, None)
    except (ValueError, TypeError) as exc:
        raise UserError(f"spectra overrides: {exc}") from None
    return dict(overrides)
