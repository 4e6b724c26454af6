"""A variant that differs from a converted model only in runtime knobs (temperature, repulsion, ...).

Such knobs change no parameter shape, so converting from scratch would rebuild the same experts and the same
k-means prototypes (same seed) and differ only in the dual bias, which is calibrated *with* the knobs the model
routes with (a bias calibrated at tau=0.1 is at the wrong scale for tau=0.05). So a derived variant is: the base
folder with its ``config.json`` ``spectra`` block edited, and every router's dual bias re-calibrated on the
same calibration text. One difference from a fresh upcycle, stated honestly: the router inputs are captured
from the (copy-upcycled) MoE model, not from the dense parent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..modelio.outdir import atomic_output_dir


@torch.no_grad()
def capture_router_inputs(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """Each router's input ``[B, T, H]`` (float32) over the calibration blocks."""
    routers = model.routers()
    captured: dict[int, list[torch.Tensor]] = {r.layer_idx: [] for r in routers}

    def hook(module: Any, args: tuple[Any, ...]) -> None:
        h = args[0].float()
        batch, steps = module.context.batch_shape or (1, h.reshape(-1, h.shape[-1]).shape[0])
        captured[module.layer_idx].append(h.reshape(batch, steps, -1).cpu())

    handles = [r.register_forward_pre_hook(hook) for r in routers]
    try:
        model.eval()
        for start in range(0, blocks.shape[0], batch_size):
            model(input_ids=blocks[start:start + batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: torch.cat(parts) for layer, parts in captured.items()}


def derive_variant(base: Path, out: Path, knobs: dict[str, Any], *, calibration: str | Path | None,
                   calibration_tokens: int, seed: int) -> list[float]:
    """Write ``out``: ``base`` with the runtime ``knobs`` set and the dual biases re-calibrated.

    Returns the per-layer load CV reached on the calibration text (what upcycle reports too).
    """
    from transformers import AutoTokenizer

    from ..finetune.api import _stored_dtype
    from ..modeling.configuration_spectra import SpectraConfig
    from ..modeling.modeling_spectra import SpectraForCausalLM
    from ..surgery.calibrate import calibrate_bias, calibration_batches
    from ..textdata import default_calibration_path, load_texts

    config = SpectraConfig.from_pretrained(base)
    try:  # a fresh config validates the knobs (ValueError naming the field); the loaded one keeps the rest
        config.spectra = SpectraConfig(text_config=config.text_config.to_dict(),
                                       spectra={**config.spectra, **knobs}).spectra
    except ValueError as exc:
        raise UserError(str(exc)) from None
    dtype = _stored_dtype(base)
    tokenizer = AutoTokenizer.from_pretrained(base, config=config, trust_remote_code=False)
    texts = [r.text for r in load_texts(calibration or default_calibration_path())]
    with atomic_output_dir(out, force=False, inputs=[base]) as tmp:
        torch.manual_seed(seed)
        model = SpectraForCausalLM.from_pretrained(base, config=config, dtype=torch.float32)
        try:
            blocks = calibration_batches(tokenizer, texts, max_tokens=calibration_tokens, seed=seed)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        inputs = capture_router_inputs(model, blocks)
        cvs = [calibrate_bias(router, inputs.pop(router.layer_idx)) for router in model.routers()]
        model.to(dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        generation = base / "generation_config.json"
        if generation.is_file() and not (tmp / generation.name).exists():
            (tmp / generation.name).write_bytes(generation.read_bytes())
    return cvs
