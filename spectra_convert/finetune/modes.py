"""What trains in each fine-tuning mode: a small registry, one class per mode behind one interface.

* ``router`` — only the SPECTRA routers (GRU, projector, expert vectors) train; every other tensor stays
  bit-identical. Cheap, and safe for a freshly upcycled model whose experts are still copies of the parent.
* ``lora``   — PEFT LoRA on the attention projections and on the fused 3-D expert tensors
  (``target_parameters``), plus the routers trained fully through ``modules_to_save=["mlp.gate"]`` (the GRU is
  not a LoRA target; matching ``"mlp.gate"`` rather than ``"gate"`` avoids ``shared_expert_gate``). With
  ``train_routers=False`` the routers stay in ``modules_to_save`` (their re-calibrated dual bias is saved with
  an unmerged adapter) but their parameters are frozen: for carved models, whose routers were fitted to the
  oracle by the converter, training them during LoRA lowers oracle recall and quality (docs/CARVING.md).
  A carved block's skipped-experts estimate (a rank-r linear map, ridge-fitted by the converter) trains fully
  too, also through ``modules_to_save`` (``ESTIMATE_MODULE``): it is the block's stand-in for the experts a
  token skips, which LoRA on the experts cannot adapt, and costs ~2% of the trainable parameters.

A mode prepares the model, tells the trainer its parameter groups (routers that train use ``--lr-router``),
names the tensors a resumable checkpoint must hold, and writes the final output folder.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..router.find import find_routers, is_router

#: Where SPECTRA routers sit in every parent (dense parents: our MoE block; MoE parents: the parent's gate).
ROUTER_MODULE = "mlp.gate"
#: A carved block's skipped-experts estimate (trained fully in lora mode; see the module doc).
ESTIMATE_MODULE = "mlp.skipped_estimate"


@dataclass
class ModeOptions:
    """The options that decide what trains; part of the resume config hash."""

    lr_router: float = 5e-5
    lr: float = 2e-4  # LoRA adapters; ``finetune`` resolves its default per model (``resolve_lora_lr``)
    lora_r: int = 16
    lora_alpha: int = 32
    target_modules: tuple[str, ...] | None = None
    train_routers: bool = True  # lora mode: False freezes the routers' parameters (their biases still move)
    resolved_targets: dict[str, list[str]] = field(default_factory=dict)  # filled by LoraMode.prepare


def rebind_router_context(model: nn.Module) -> None:
    """Point every router at the model's shared ``RoutingContext``.

    PEFT's ``modules_to_save`` deep-copies the router, and the deep copy gets a private context: it would no
    longer see the batch shape (its GRU would run across sequences), the cache, or the record list the aux
    loss is computed from. Re-binding restores the sharing; call it after wrapping, merging or loading.
    """
    owner = next((m for m in model.modules() if "routing_context" in m.__dict__), None)
    if owner is None:
        return
    for router in find_routers(model):
        router.__dict__["context"] = owner.__dict__["routing_context"]


def _router_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for router in find_routers(model) for p in router.parameters()}


class RouterMode:
    """Only router parameters train."""

    name = "router"

    def prepare(self, model: nn.Module, options: ModeOptions) -> nn.Module:
        model.requires_grad_(False)
        for router in find_routers(model):
            router.requires_grad_(True)
        return model

    def param_groups(self, model: nn.Module, options: ModeOptions) -> list[dict[str, Any]]:
        params = [p for router in find_routers(model) for p in router.parameters() if p.requires_grad]
        return [{"params": params, "lr": options.lr_router}]

    def save(self, model: nn.Module, out: Path, *, merge: bool, dtype: torch.dtype,
             state_dict: dict[str, torch.Tensor] | None = None) -> None:
        if state_dict is not None:  # FSDP / DeepSpeed: the full state was gathered by the trainer
            state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
        model.to(dtype).save_pretrained(out, state_dict=state_dict)


def _has_estimate(model: nn.Module) -> bool:
    return any(name.endswith(ESTIMATE_MODULE) for name, _ in model.named_modules())


class LoraMode:
    """PEFT LoRA on attention and expert projections; routers trained fully via ``modules_to_save``."""

    name = "lora"

    def prepare(self, model: nn.Module, options: ModeOptions) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        modules, parameters = resolve_lora_targets(model, options.target_modules)
        options.resolved_targets = {"target_modules": modules, "target_parameters": parameters}
        config = LoraConfig(
            r=options.lora_r,
            lora_alpha=options.lora_alpha,
            lora_dropout=0.0,  # keeps a resumed run bit-identical to an uninterrupted one
            target_modules=modules or None,
            target_parameters=parameters or None,
            modules_to_save=[ROUTER_MODULE] + ([ESTIMATE_MODULE] if _has_estimate(model) else []),
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():
            # PEFT 0.21 reads transformers 5's deprecated ``is_gradient_checkpointing`` alias while wrapping any
            # model (transformers' own included): a FutureWarning about two dependencies' versions that says
            # nothing to a finetune user, printed on every run; only that message is silenced.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, config)
        rebind_router_context(peft_model)
        if not options.train_routers:
            for router in find_routers(peft_model):
                router.requires_grad_(False)
        return peft_model

    def param_groups(self, model: nn.Module, options: ModeOptions) -> list[dict[str, Any]]:
        router_ids = _router_param_ids(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        routers = [p for p in trainable if id(p) in router_ids]
        others = [p for p in trainable if id(p) not in router_ids]
        groups = [{"params": routers, "lr": options.lr_router}, {"params": others, "lr": options.lr}]
        return [group for group in groups if group["params"]]

    def save(self, model: nn.Module, out: Path, *, merge: bool, dtype: torch.dtype,
             state_dict: dict[str, torch.Tensor] | None = None) -> None:
        if merge:
            merged = model.merge_and_unload()
            rebind_router_context(merged)
            merged.to(dtype).save_pretrained(out)
            return
        # PEFT records the base folder from ``config._name_or_path``: the trainer loads MODEL by absolute path,
        # so the adapter folder points at its base wherever it is read from.
        model.save_pretrained(out, state_dict=state_dict)


MODES: dict[str, RouterMode | LoraMode] = {"router": RouterMode(), "lora": LoraMode()}


ROUTER_TRAINING = ("auto", "train", "freeze")


def resolve_router_training(routers: str, mode: str, model_path: Path) -> bool:
    """Whether the routers' parameters train: ``--routers`` resolved against the mode and the model.

    ``auto`` freezes them in lora mode for carved models (``expert_combine: sum``). Measured on SmolLM2-135M
    carved to 56% active FFN, distilled LoRA (docs/CARVING.md): routers trained at lr 1e-3 gave 1.83x the
    parent's unseen-domain perplexity at 121 steps and drifted up to 1.90x by 30 minutes, oracle recall falling
    0.733 -> 0.648; frozen, 1.63x at 120 steps and 1.58x at 30 minutes, recall 0.741. Router mode trains nothing
    else, so freezing there is an error."""
    if routers not in ROUTER_TRAINING:
        raise UserError(f"unknown --routers {routers!r}; choose one of: {', '.join(ROUTER_TRAINING)}")
    if mode == "router":
        if routers == "freeze":
            raise UserError("--routers freeze leaves nothing to train in --mode router (use --mode lora)")
        return True
    if routers != "auto":
        return routers == "train"
    return not is_carved(model_path)


#: The LoRA adapters' rate when ``--lr`` is not given: PEFT practice for most models, higher for a carve.
LORA_LR = 2e-4
CARVED_LORA_LR = 1e-3


def resolve_lora_lr(lr: float | None, model_path: Path) -> float:
    """``lr`` when given, else ``CARVED_LORA_LR`` for carved models and ``LORA_LR`` for the others.

    Why a carve gets more: its LoRA is a recovery (get the parent's predictions back after 44% of the FFN
    neurons were dropped per token), not a gentle adaptation. Measured on SmolLM2-135M carved to 56%, distilled,
    12 minutes each (docs/CARVING.md): 2e-4 reached 1.52x the parent's unseen perplexity at 87 steps, 5e-4
    1.47x at 94, 1e-3 1.41x at 113 (with shared-expert LoRA)."""
    if lr is not None:
        return lr
    return CARVED_LORA_LR if is_carved(model_path) else LORA_LR


def is_carved(model_path: Path) -> bool:
    """Whether the folder holds a carved model (``expert_combine: sum``: experts are slices of the parent's FFN)."""
    import json

    knobs = json.loads((model_path / "config.json").read_text()).get("spectra", {})
    return knobs.get("expert_combine", "softmax") == "sum"


def get_mode(name: str) -> RouterMode | LoraMode:
    if name not in MODES:
        raise UserError(f"unknown --mode {name!r}; choose one of: {', '.join(MODES)}")
    return MODES[name]


# -- LoRA target resolution ------------------------------------------------------------------------------------


def lora_candidates(model: nn.Module) -> tuple[list[str], list[str]]:
    """(linear module names, 3-D expert parameter names) a LoRA adapter can target, routers excluded. The 3-D
    names include a carved block's shared expert (one fused expert, ``mlp.shared_expert.gate_up_proj``): every
    token runs it, so it is the first place an adapter can recover what the skipped experts took.

    Module candidates are leaf names (``q_proj``); expert parameters are dotted suffixes
    (``mlp.experts.gate_up_proj``) because PEFT's ``target_parameters`` matches on them.
    """
    from transformers.pytorch_utils import Conv1D

    linear: list[str] = []
    params: list[str] = []
    router_prefixes = [name + "." for name, m in model.named_modules() if is_router(m)]
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in router_prefixes) or is_router(module):
            continue
        if isinstance(module, (nn.Linear, Conv1D)):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in linear:
                linear.append(leaf)
        for pname, param in module.named_parameters(recurse=False):
            if param.dim() == 3 and ("experts" in name or name.endswith("shared_expert")):
                suffix = ".".join(name.split(".")[-2:] + [pname])
                if suffix not in params:
                    params.append(suffix)
    return linear, params


def _attention_linears(model: nn.Module, linear: list[str]) -> list[str]:
    """Default LoRA module targets: the linear leaves that live inside attention blocks."""
    names = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in linear and "attn" in name and leaf not in names:
            names.append(leaf)
    return names


def resolve_lora_targets(model: nn.Module, requested: tuple[str, ...] | None) -> tuple[list[str], list[str]]:
    """Split requested targets into PEFT ``target_modules`` and ``target_parameters``; refuse unknown names."""
    linear, params = lora_candidates(model)
    if not requested:
        modules = _attention_linears(model, linear)
        if not modules and not params:
            raise UserError("no LoRA targets found in MODEL (no attention projections, no fused expert tensors)")
        return modules, params
    modules, parameters, unmatched = [], [], []
    for name in requested:
        if name in linear:
            modules.append(name)
        elif name in params or any(p.endswith("." + name) or p == name for p in params):
            parameters.extend(p for p in params if p == name or p.endswith("." + name))
        else:
            unmatched.append(name)
    if unmatched:
        raise UserError(
            f"LoRA target module(s) {', '.join(unmatched)} match nothing in MODEL; candidates: "
            f"{', '.join(linear + params)}"
        )
    return modules, sorted(set(parameters), key=parameters.index)
