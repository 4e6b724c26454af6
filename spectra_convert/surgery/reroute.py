"""Rerouting: an MoE checkpoint (Mixtral, Qwen2/3-MoE, OLMoE) -> the same experts routed by SPECTRA.

Only the routers change (docs/ARCHITECTURE.md, "Conversions"). Flow:
1. resolve MODEL, read its config, pick the architecture adapter, validate every shard header;
2. start writing the output shards on a background thread at once — before torch and transformers are even
   imported: shards without a gate are hard-linked (copied across filesystems); shards with gates are
   rewritten without the old ``gate.weight``, every other tensor byte-copied from the source file
   (``copy_file_range``, a few calls per shard). Expert tensors keep their names and bytes and are never
   loaded for writing, so memory stays ~ one layer whatever the checkpoint size;
3. meanwhile tokenize calibration text and run the parent one decoder layer at a time (``streaming``), so
   each layer's FFN inputs exist while that layer's new router is initialised (gate | distill | kmeans) and
   its dual bias calibrated on hard top-k loads; top-k agreement with the old gate is measured on the same
   tokens. The routers (a few MB) go into one extra shard;
4. config (``auto_map``), runtime code, tokenizer/side files, model card — all in a temp folder renamed into
   place at the end.

Why the overlap: byte copying is as slow as ``cp`` and the calibration forward + imports cost about as much
again; done one after the other a 2.3 GB reroute took 2.6x ``cp``, overlapped it is close to the copy alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from ..console import err_console, human_bytes, progress, summary_table
from ..errors import UserError
from ..modelcard import write_model_card
from ..modelio.adapters import MoeAdapter, adapter_for
from ..modelio.checkpoint import CheckpointReader, ShardWriter
from ..modelio.config import read_parent_config, read_raw_config
from ..modelio.outdir import atomic_output_dir, check_free_space, existing_ancestor
from ..modelio.resolve import resolve_model_dir
from ..modelio.side_files import copy_side_files, write_runtime_files, write_spectra_config

if TYPE_CHECKING:  # imported inside the functions: the shard copy starts before torch/transformers load
    import torch

CALIBRATION_BATCH = 8  # sequences per layer forward while streaming
INIT_METHODS = ("orthogonal", "kmeans", "gate", "distill")  # = router.prototypes.INIT_METHODS (tested), without torch


@dataclass
class RerouteResult:
    """What a reroute produced (also printed as the closing summary)."""

    output: Path
    experts: int
    top_k: int
    layers: int
    router_init: str
    params_total: int
    params_active: int
    output_bytes: int
    layer_cv: dict[int, float] = field(default_factory=dict)
    layer_agreement: dict[int, float] = field(default_factory=dict)
    shards_linked: int = 0
    shards_copied: int = 0
    shards_rewritten: int = 0


def _check_options(router_init: str, calibration_tokens: int, router_dim: int) -> None:
    if router_init not in INIT_METHODS:
        raise UserError(f"--router-init must be one of {', '.join(INIT_METHODS)}, got {router_init!r}")
    if calibration_tokens < 1:
        raise UserError(f"--calibration-tokens must be positive, got {calibration_tokens}")
    if router_dim < 1:
        raise UserError(f"--router-dim must be positive, got {router_dim}")


def _moe_shape(model: str, config, adapter) -> tuple[int, int]:
    if not isinstance(adapter, MoeAdapter):
        raise UserError(
            f"{model} is a dense model ({config.model_type}); use `spectra-convert upcycle` to turn it into a "
            "mixture of experts"
        )
    experts, top_k = adapter.num_experts(config), adapter.top_k(config)
    if experts < 2:
        raise UserError(f"{model} has {experts} expert(s) per layer; rerouting needs at least 2")
    if not 1 <= top_k <= experts:
        raise UserError(f"{model}: config top-k ({top_k}) must be between 1 and the number of experts ({experts})")
    return experts, top_k


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # tokenizer loading fails in many library-specific ways
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the tokenizer from {model_dir} (calibration needs it): {text}") from None


def _param_counts(reader: CheckpointReader, adapter: MoeAdapter, layers: list[int], experts: int,
                  top_k: int, gate_keys: set[str], router_numel: int) -> tuple[int, int]:
    """(total, active per token) parameters of the rerouted model: only top-k of E routed experts run."""
    def numel(name: str) -> int:
        count = 1
        for dim in reader.info(name).shape:
            count *= dim
        return count

    total = sum(numel(k) for k in reader.keys() if k not in gate_keys) + router_numel * len(layers)
    routed = 0
    for i in layers:
        pattern = re.compile(re.escape(adapter.disk_prefix(i)) + r"experts\.\d+\.")
        routed += sum(numel(k) for k in reader.keys() if pattern.match(k))
    return total, total - routed * (experts - top_k) // experts


def _gate_layers(model_dir: Path, raw_config: dict, adapter: MoeAdapter, reader: CheckpointReader) -> list[int]:
    layers = int(raw_config.get("num_hidden_layers") or 0)
    found = [i for i in range(layers) if adapter.gate_key(i) in reader]
    if not found:
        raise UserError(f"{model_dir}: no router weights found (expected e.g. {adapter.gate_key(0)!r})")
    return found


@dataclass
class _Plan:
    """What the cheap checks found, before torch or transformers is imported: the parent folder, its config
    and adapter, its checkpoint (headers validated), the MoE layers and their gates, the calibration texts."""

    model_dir: Path
    raw_config: dict
    adapter: MoeAdapter
    reader: CheckpointReader
    layers: list[int]
    gate_keys: set[str]
    texts: list[str]


@dataclass
class _Parent:
    """What loading the parent gives the routers: its config, the output's config, calibration token blocks."""

    config: Any
    spectra_config: Any
    experts: int
    top_k: int
    blocks: Any  # [B, T] LongTensor


def reroute(
    model: str,
    out: str | Path,
    *,
    router_init: str = "gate",
    calibration: str | Path | None = None,
    calibration_tokens: int = 8192,
    router_dim: int = 128,
    seed: int = 0,
    force: bool = False,
) -> RerouteResult:
    """Replace the routers of the MoE model ``model`` (folder or Hub id) by calibrated SPECTRA routers in ``out``.

    Steps: plan (cheap checks), copy the parent's shards (on a background thread from here on), load the
    parent's config and calibration text, calibrate the routers, write them and the folder's other files."""
    _check_options(router_init, calibration_tokens, router_dim)
    out = Path(out)
    plan = _plan(model, calibration)
    check_free_space(out, _written_bytes(plan.reader, plan.gate_keys, plan.model_dir, out))
    with atomic_output_dir(out, force=force, inputs=[plan.model_dir], durable=True) as tmp, \
            _CountingWriter(tmp, background=True) as writer:
        # The byte copying runs while the heavy imports and the calibration forward do.
        _queue_parent_shards(plan.reader, writer, plan.gate_keys)
        parent = _load_parent(model, plan, router_dim, calibration_tokens, seed)
        routers, layer_cv, layer_agreement = _calibrate_routers(plan, parent, router_init, seed)
        _write(tmp, writer, model, plan, parent, routers)
        output_bytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())

    router_numel = sum(t.numel() for t in next(iter(routers.values())).values())
    total, active = _param_counts(plan.reader, plan.adapter, plan.layers, parent.experts, parent.top_k,
                                  plan.gate_keys, router_numel)
    result = RerouteResult(
        output=out, experts=parent.experts, top_k=parent.top_k, layers=len(plan.layers), router_init=router_init,
        params_total=total, params_active=active, output_bytes=output_bytes, layer_cv=layer_cv,
        layer_agreement=layer_agreement, shards_linked=writer.linked,
        shards_copied=writer.link_attempts - writer.linked, shards_rewritten=writer.rewritten,
    )
    _print_summary(model, result, parent.blocks.numel())
    return result


def _plan(model: str, calibration: str | Path | None) -> _Plan:
    """Checks from config.json and the shard headers alone (no torch/transformers yet), so a bad input fails
    in a second and the shard copying can start at once."""
    from ..textdata import default_calibration_path, load_texts

    model_dir = resolve_model_dir(model)
    raw_config = read_raw_config(model_dir)
    adapter = adapter_for(raw_config)
    _moe_shape(model, SimpleNamespace(**raw_config), adapter)
    reader = CheckpointReader(model_dir)
    layers = _gate_layers(model_dir, raw_config, adapter, reader)
    texts = [record.text for record in load_texts(calibration or default_calibration_path())]
    return _Plan(model_dir, raw_config, adapter, reader, layers, {adapter.gate_key(i) for i in layers}, texts)


def _load_parent(model: str, plan: _Plan, router_dim: int, calibration_tokens: int, seed: int) -> _Parent:
    """The parent's transformers config, the output's SpectraConfig and the calibration token blocks."""
    from ..router.calibrate import calibration_batches

    parent_config = read_parent_config(plan.model_dir)
    experts, top_k = _moe_shape(model, parent_config, plan.adapter)
    spectra_config = _spectra_config(parent_config, experts, top_k, router_dim)
    tokenizer = _load_tokenizer(plan.model_dir)
    try:
        blocks = calibration_batches(tokenizer, plan.texts, max_tokens=calibration_tokens, seed=seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if int(blocks.max()) >= parent_config.vocab_size:
        raise UserError(f"the tokenizer in {plan.model_dir} produces ids beyond the model's vocabulary "
                        f"({int(blocks.max())} >= {parent_config.vocab_size})")
    return _Parent(parent_config, spectra_config, experts, top_k, blocks)


def _write(tmp: Path, writer: _CountingWriter, model: str, plan: _Plan, parent: _Parent,
           routers: dict[int, dict[str, Any]]) -> None:
    """The new routers' tensors, then (once the shard copies are done) the index and the folder's other files."""
    for i in plan.layers:
        for name, tensor in routers[i].items():
            writer.add(name, tensor)
    _finish_writing(writer, plan.reader)
    write_spectra_config(tmp, parent.spectra_config)
    write_runtime_files(tmp)
    copy_side_files(plan.model_dir, tmp)
    write_model_card(tmp, base_model=model)


def _spectra_config(parent_config, experts: int, top_k: int, router_dim: int):
    from ..modeling.configuration_spectra import SpectraConfig

    try:
        return SpectraConfig(
            text_config=parent_config.to_dict(),
            spectra={"num_experts": experts, "top_k": top_k, "router_dim": router_dim, "source": "rerouted"},
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _calibrate_routers(plan: _Plan, parent: _Parent, router_init: str, seed: int):
    """Stream the parent layer by layer; build, initialise and calibrate one SpectraRouter per MoE layer."""
    import torch

    from ..modeling.modeling_spectra import SpectraRouter
    from ..router.calibrate import calibrate_bias, topk_agreement
    from ..router.prototypes import init_router
    from .streaming import stream_ffn_inputs

    routers: dict[int, dict[str, torch.Tensor]] = {}
    layer_cv: dict[int, float] = {}
    layer_agreement: dict[int, float] = {}
    reader, adapter, blocks = plan.reader, plan.adapter, parent.blocks
    wanted = set(plan.layers)
    torch.manual_seed(seed)

    def on_layer(i: int, inputs: torch.Tensor) -> None:
        if i not in wanted:
            return
        router = SpectraRouter(parent.config.hidden_size, parent.spectra_config.spectra, i)
        gate_weight = reader.get(adapter.gate_key(i)).float()
        init_router(router, inputs, init=router_init, gate_weight=gate_weight, seed=seed + i)
        layer_cv[i] = calibrate_bias(router, inputs)
        layer_agreement[i] = topk_agreement(router, inputs, gate_weight, parent.top_k)
        routers[i] = {adapter.router_prefix(i) + name: t.detach().float().contiguous()
                      for name, t in router.state_dict().items()}

    batches = list(blocks.split(CALIBRATION_BATCH))
    total_layers = adapter.num_layers(parent.config)
    with progress() as bar:
        task = bar.add_task(f"calibrating routers on {blocks.numel()} tokens ({router_init} init)", total=total_layers)
        stream_ffn_inputs(plan.model_dir, parent.config, batches, on_layer=on_layer, reader=reader,
                          on_progress=lambda i: bar.advance(task))
    return routers, layer_cv, layer_agreement


class _CountingWriter(ShardWriter):
    """ShardWriter that also counts what it did (for the summary)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.link_attempts = 0
        self.rewritten = 0

    def link_shard(self, src_path, names=None):
        self.link_attempts += 1
        return super().link_shard(src_path, names)

    def rewrite_shard(self, src_path, *, keep, add=None):
        self.rewritten += 1
        return super().rewrite_shard(src_path, keep=keep, add=add)


def _written_bytes(reader, gate_keys: set[str], model_dir: Path, out: Path) -> int:
    """Bytes the output will take on disk: the shards rewritten without their gates, plus every other shard
    when it cannot be hard-linked (the output is on another filesystem than MODEL)."""
    linkable = existing_ancestor(out).stat().st_dev == Path(model_dir).stat().st_dev
    return sum(shard.stat().st_size for shard in reader.shards
               if not linkable or any(n in gate_keys for n in reader.keys_in(shard)))


def _queue_parent_shards(reader, writer: _CountingWriter, gate_keys: set[str]) -> None:
    """Queue the parent's shards on the background writer: linked when they hold no gate, else rewritten
    without it (every other tensor byte-copied, in file order)."""
    for shard in reader.shards:
        names = reader.keys_in(shard)
        if any(n in gate_keys for n in names):
            writer.rewrite_shard(shard, keep=[n for n in names if n not in gate_keys])
        else:
            writer.link_shard(shard, names)


def _finish_writing(writer: _CountingWriter, reader) -> None:
    """Wait for the shard copies still queued (the progress bar shows what is left) and write the index."""
    with progress() as bar:
        task = bar.add_task("writing shards (experts linked or byte-copied)", total=len(reader.shards) + 1)
        writer.close(on_progress=lambda done, total: bar.update(task, completed=done, total=total))


def _print_summary(model: str, result: RerouteResult, tokens: int) -> None:
    cvs, agreements = list(result.layer_cv.values()), list(result.layer_agreement.values())
    summary_table(
        f"rerouted {model} -> {result.output}",
        ["", "value"],
        [["experts / top-k", f"{result.experts} / {result.top_k}"],
         ["MoE layers", result.layers],
         ["router init", result.router_init],
         ["params total / active", f"{result.params_total / 1e6:.2f}M / {result.params_active / 1e6:.2f}M"],
         ["output size", human_bytes(result.output_bytes)],
         ["shards linked / copied / rewritten",
          f"{result.shards_linked} / {result.shards_copied} / {result.shards_rewritten}"],
         ["calibration CV mean / worst", f"{sum(cvs) / len(cvs):.4f} / {max(cvs):.4f}"],
         ["top-k agreement with old gate (mean)", f"{sum(agreements) / len(agreements):.4f}"]],
    )
    summary_table(
        f"per-layer calibration ({tokens} tokens; top-k agreement = share of the old gate's top-k kept)",
        ["layer", "calibration CV", "top-k agreement"],
        [[i, result.layer_cv[i], result.layer_agreement[i]] for i in sorted(result.layer_cv)],
    )
    err_console.print(f"[green]done:[/] {result.output}")
