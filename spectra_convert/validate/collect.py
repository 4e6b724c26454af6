"""Run a model over held-out texts and record what its routers did.

Routers are found by class name (``router.find``; docs/ARCHITECTURE.md, "The router contract"): a converted
folder loads its own copy of ``modeling_spectra.py`` through ``trust_remote_code``. A ``RouterTap`` reads each
router's ``selected_experts`` from ``output[2]``, the raw cosine scores from ``context.records`` (filled
because we pass ``output_router_logits=True``) and, for the baselines, the router's input hidden states.
Pad tokens are dropped with the attention mask; NLL is computed from the logits here (per real-token pair,
which a batch-mean ``loss`` cannot give).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..dtypes import dtype_name, torch_dtype
from ..errors import UserError
from ..modelio import resolve
from ..router.find import find_routers, parent_gates
from ..router.tap import RouterTap, gate_reader
from ..textdata import TextRecord

# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def resolve_model_dir(name: str | Path, *, what: str = "model") -> Path:
    """A local folder, or a Hub id already in the local Hugging Face cache (validate never downloads)."""
    return resolve.resolve_model_dir(str(name), download=False, what=what)


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"--device {device!r}: {exc}") from None


def _dtype(dtype: str | None, device: torch.device) -> Any:
    """float32 on CPU (exact comparisons, and CPU bf16 matmuls are slow); the checkpoint's dtype on GPU."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else "auto"
    if dtype_name(dtype, extra=("auto",)) == "auto":
        return "auto"
    return torch_dtype(dtype)


def _not_spectra(path: Path, detail: str) -> UserError:
    return UserError(
        f"{path} has no SPECTRA routers ({detail}); convert it first with `spectra-convert upcycle` (dense) "
        "or `spectra-convert reroute` (MoE)"
    )


def load_spectra_model(name: str | Path, *, device: str | None = None, dtype: str | None = None):
    """Load a converted SPECTRA folder and its tokenizer; a non-SPECTRA model is a one-line UserError."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(name)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json; pass a model folder written by spectra-convert")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot read is a user problem
        raise UserError(f"{path}/config.json: cannot load the config ({type(exc).__name__}: {exc})") from None
    if getattr(config, "model_type", None) != "spectra":
        raise _not_spectra(path, f"model_type is {getattr(config, 'model_type', None)!r}")
    dev = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=_dtype(dtype, dev))
    if not find_routers(model):
        raise _not_spectra(path, "no SpectraRouter module after loading")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{path}: cannot load the tokenizer ({type(exc).__name__}: {exc})") from None
    model.to(dev).eval()
    return model, tokenizer


def load_parent_model(name: str | Path, *, device: str | None = None, dtype: str | None = None):
    """The parent (dense or original MoE) for perplexity and gate agreement: a folder or a ``.gguf`` file."""
    from transformers import AutoModelForCausalLM

    path = Path(name).expanduser()
    dev = pick_device(device)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"--parent {name}: no such file")
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=_dtype(dtype, dev))
    else:
        folder = resolve_model_dir(name, what="--parent")
        if not (folder / "config.json").is_file():
            raise UserError(f"--parent {folder}: no config.json; pass a model folder or a .gguf file")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=_dtype(dtype, dev))
    return model.to(dev).eval()


# --------------------------------------------------------------------------------------------------------------
# Tokens and batches
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TokenizedTexts:
    """Token ids per text (truncated, capped), with the index and domain of the record each came from."""

    ids: list[list[int]]
    record_index: list[int]
    domains: list[str] | None


def tokenize_texts(
    tokenizer: Any, records: Sequence[TextRecord], *, max_length: int = 512, max_tokens: int | None = None
) -> TokenizedTexts:
    """Tokenise each text (truncate to ``max_length``), stopping when ``max_tokens`` real tokens are taken."""
    if max_length < 2:
        raise UserError(f"max_length must be at least 2, got {max_length}")
    if max_tokens is not None and max_tokens < 2:
        raise UserError(f"--max-tokens must be at least 2, got {max_tokens}")
    has_domains = any(r.domain is not None for r in records)
    ids, index, domains = [], [], []
    total = 0
    for i in interleave_domains(records) if max_tokens is not None else range(len(records)):
        record = records[i]
        tokens = tokenizer(record.text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        if max_tokens is not None:
            tokens = tokens[: max_tokens - total]
        if len(tokens) < 2:  # nothing to predict and no consecutive pair
            if max_tokens is not None and total >= max_tokens:
                break
            continue
        ids.append(list(tokens))
        index.append(i)
        domains.append(record.domain if record.domain is not None else "(none)")
        total += len(tokens)
        if max_tokens is not None and total >= max_tokens:
            break
    if not ids:
        raise UserError("the data has no text that tokenises to 2 or more tokens")
    return TokenizedTexts(ids, index, domains if has_domains else None)


def interleave_domains(records: Sequence[TextRecord]) -> list[int]:
    """Record indices taken round-robin over domains (file order within a domain).

    A token cap applied in file order would keep only the first domains of a file sorted by domain (the
    fixture ``mixed_eval.jsonl`` is); round-robin keeps every domain in the sample.
    """
    queues: dict[str | None, list[int]] = {}
    for i, record in enumerate(records):
        queues.setdefault(record.domain, []).append(i)
    order: list[int] = []
    lists = list(queues.values())
    for rank in range(max(len(q) for q in lists)):
        order.extend(q[rank] for q in lists if rank < len(q))
    return order


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T], counted over real tokens only (left padding safe)


def make_batch(seqs: Sequence[Sequence[int]], pad_id: int, *, side: str = "right") -> Batch:
    """Pad ``seqs`` into one batch; positions count real tokens so padding never shifts them."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, span] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, span] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids, mask, positions)


def plan_batches(seqs: Sequence[Sequence[int]], pad_id: int, *, batch_tokens: int = 2048) -> list[Batch]:
    """Consecutive sequences grouped while ``rows x longest`` stays within ``batch_tokens`` (order kept)."""
    batches, group, longest = [], [], 0
    for seq in seqs:
        new_longest = max(longest, len(seq))
        if group and new_longest * (len(group) + 1) > batch_tokens:
            batches.append(make_batch(group, pad_id))
            group, new_longest = [], len(seq)
        group.append(seq)
        longest = new_longest
    if group:
        batches.append(make_batch(group, pad_id))
    return batches


def pad_id_of(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


# --------------------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LayerCapture:
    layer: int
    selected: np.ndarray  # [N, k] int64, best first
    entropy_sum: float = 0.0  # sum over tokens of the routing entropy (nats)
    inputs: torch.Tensor | None = None  # [N, H] float16 router inputs (baselines only)


@dataclass
class Collection:
    """Everything validate measures comes from here; token order is row-major over the batches."""

    num_experts: int
    top_k: int
    token_ids: np.ndarray  # [N]
    seq_ids: np.ndarray  # [N] index into the tokenised texts
    domains: np.ndarray | None  # [N] domain per token
    layers: list[LayerCapture]
    nll_sum: float = 0.0
    nll_count: int = 0
    expert_vectors: list[np.ndarray] = field(default_factory=list)  # per layer, [E, d]
    oracle_recall: list[float] | None = None  # carved models: per layer, share of the oracle's top-k selected

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


def _nll(logits: torch.Tensor, batch: Batch) -> tuple[float, int]:
    """Summed next-token NLL over pairs of real tokens, one row at a time (V-wide logits are large)."""
    total, count = 0.0, 0
    ids, mask = batch.input_ids.to(logits.device), batch.attention_mask.to(logits.device).bool()
    for row in range(logits.shape[0]):
        valid = mask[row, :-1] & mask[row, 1:]
        if not bool(valid.any()):
            continue
        pred = logits[row, :-1][valid].float()
        target = ids[row, 1:][valid]
        total += float(F.cross_entropy(pred, target, reduction="sum"))
        count += int(valid.sum())
    return total, count


def _forward(model: torch.nn.Module, batch: Batch, *, router_records: bool) -> Any:
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = dict(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
        position_ids=batch.position_ids.to(device), use_cache=False,
    )
    if router_records:
        kwargs["output_router_logits"] = True
    return model(**kwargs)


@torch.inference_mode()
def collect_routing(
    model: torch.nn.Module,
    texts: TokenizedTexts,
    pad_id: int,
    *,
    batch_tokens: int = 2048,
    capture_inputs: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> Collection:
    """Run ``model`` over ``texts``; record every router's choices, routing entropy, NLL (and inputs)."""
    routers = find_routers(model)
    if not routers:
        raise UserError("the model has no SPECTRA routers; convert it first with `spectra-convert upcycle` "
                        "(dense) or `spectra-convert reroute` (MoE)")
    first = routers[0]
    num_experts, top_k = int(first.num_experts), int(first.top_k)
    layers = [LayerCapture(int(getattr(r, "layer_idx", i)), np.zeros((0, top_k), dtype=np.int64))
              for i, r in enumerate(routers)]
    selected_parts: list[list[np.ndarray]] = [[] for _ in routers]
    input_parts: list[list[torch.Tensor]] = [[] for _ in routers]
    token_ids, seq_ids = [], []
    nll_sum, nll_count = 0.0, 0
    batches = plan_batches(texts.ids, pad_id, batch_tokens=batch_tokens)
    seq_offset = 0
    from ..router.oracle_fit import OracleTap, carved_blocks

    oracle = OracleTap(model) if carved_blocks(model) else None
    with RouterTap(routers, inputs=capture_inputs) as tap, oracle or contextlib.nullcontext():
        for batch in batches:
            out = _forward(model, batch, router_records=True)
            captured = tap.take(batch.attention_mask)
            if oracle is not None:
                oracle.take(batch.attention_mask)
            for index, entry in enumerate(captured):
                selected_parts[index].append(entry["selected"].cpu().numpy().astype(np.int64))
                log_p = torch.log_softmax(entry["scores"].float(), dim=-1)
                layers[index].entropy_sum += float(-(log_p.exp() * log_p).sum())
                if capture_inputs:
                    input_parts[index].append(entry["inputs"].to("cpu", torch.float16))
            mask = batch.attention_mask.bool()
            token_ids.append(batch.input_ids[mask].numpy())
            rows = torch.arange(batch.input_ids.shape[0]).unsqueeze(1).expand_as(mask)
            seq_ids.append((rows[mask] + seq_offset).numpy())
            seq_offset += batch.input_ids.shape[0]
            part_sum, part_count = _nll(out.logits, batch)
            nll_sum, nll_count = nll_sum + part_sum, nll_count + part_count
            del out
            if on_batch is not None:
                on_batch(int(mask.sum()))
    for index, layer in enumerate(layers):
        layer.selected = np.concatenate(selected_parts[index])
        if capture_inputs:
            layer.inputs = torch.cat(input_parts[index])
    seq = np.concatenate(seq_ids)
    domains = None
    if texts.domains is not None:
        domains = np.asarray(texts.domains, dtype=object)[seq]
    vectors = [r.unit_expert_vectors().detach().float().cpu().numpy() for r in routers]
    return Collection(num_experts, top_k, np.concatenate(token_ids), seq, domains, layers, nll_sum, nll_count,
                      vectors, oracle.recall() if oracle is not None else None)


@torch.inference_mode()
def parent_pass(
    parent: torch.nn.Module,
    texts: TokenizedTexts,
    pad_id: int,
    *,
    batch_tokens: int = 2048,
    gate_top_k: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[float, int, list[np.ndarray] | None]:
    """NLL of the parent on the same tokens, and (MoE parents) its original gates' selected experts per layer."""
    gates = parent_gates(parent) if gate_top_k else []
    selected_parts: list[list[np.ndarray]] = [[] for _ in gates]
    nll_sum, nll_count = 0.0, 0
    tap = RouterTap(gates, reader=gate_reader(gate_top_k or 1))
    with tap:
        for batch in plan_batches(texts.ids, pad_id, batch_tokens=batch_tokens):
            out = _forward(parent, batch, router_records=False)
            if gates:
                for index, entry in enumerate(tap.take(batch.attention_mask)):
                    selected_parts[index].append(entry["selected"].cpu().numpy().astype(np.int64))
            part_sum, part_count = _nll(out.logits, batch)
            nll_sum, nll_count = nll_sum + part_sum, nll_count + part_count
            del out
            if on_batch is not None:
                on_batch(int(batch.attention_mask.sum()))
    selected = [np.concatenate(parts) for parts in selected_parts] if gates else None
    return nll_sum, nll_count, selected


# --------------------------------------------------------------------------------------------------------------
# Batch invariance
# --------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def batch_invariance(model: torch.nn.Module, seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, Any]:
    """Route each sequence alone, then all together with right and with left padding; count disagreements.

    SPECTRA's dual-bias routing is per-token and causal (docs/ARCHITECTURE.md, "Routing"), so a token's experts must not depend on
    its batch-mates or on where padding sits. Sequences are cut to different lengths so padding really occurs.
    Compared: the selected expert SET of every real token in every layer.
    """
    routers = find_routers(model)
    sample = [list(s[: max(2, 96 - 16 * i)]) for i, s in enumerate(seqs)]
    alone: list[list[np.ndarray]] = []
    with RouterTap(routers) as tap:
        for seq in sample:
            batch = make_batch([seq], pad_id)
            _forward(model, batch, router_records=True)
            alone.append([np.sort(e["selected"].cpu().numpy(), axis=-1) for e in tap.take(batch.attention_mask)])
        result: dict[str, Any] = {"texts": len(sample), "tokens": int(sum(len(s) for s in sample)),
                                  "layers": len(routers)}
        for side in ("right", "left"):
            batch = make_batch(sample, pad_id, side=side)
            _forward(model, batch, router_records=True)
            captured = tap.take(batch.attention_mask)
            lengths = [len(s) for s in sample]
            disagree = 0
            for layer, entry in enumerate(captured):
                rows = np.split(np.sort(entry["selected"].cpu().numpy(), axis=-1), np.cumsum(lengths)[:-1])
                for text, got in enumerate(rows):
                    disagree += int((got != alone[text][layer]).any(axis=-1).sum())
            result[f"disagree_{side}_padding"] = disagree
    result["comparisons"] = result["tokens"] * result["layers"]
    result["agree"] = result["disagree_right_padding"] == 0 and result["disagree_left_padding"] == 0
    return result


def mean_routing_entropy(layer: LayerCapture) -> float:
    n = layer.selected.shape[0]
    return layer.entropy_sum / n if n else math.nan
