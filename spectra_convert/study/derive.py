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
from ..modelio.config import stored_dtype
from ..modelio.outdir import atomic_output_dir


def derive_variant(base: Path, out: Path, knobs: dict[str, Any], *, calibration: str | Path | None,
                   calibration_tokens: int, seed: int) -> list[float]:
    """Write ``out``: ``base`` with the runtime ``knobs`` set and the dual biases re-calibrated.

    Returns the per-layer load CV reached on the calibration text (what upcycle reports too).
    """
    from transformers import AutoTokenizer

    from ..modeling.configuration_spectra import SpectraConfig
    from ..modeling.modeling_spectra import SpectraForCausalLM
    from ..router.calibrate import calibrate_bias, calibration_batches
    from ..router.tap import capture_inputs
    from ..textdata import default_calibration_path, load_texts

    config = SpectraConfig.from_pretrained(base)
    try:  # a fresh config validates the knobs (ValueError naming the field); the loaded one keeps the rest
        config.spectra = SpectraConfig(text_config=config.text_config.to_dict(),
                                       spectra={**config.spectra, **knobs}).spectra
    except ValueError as exc:
        raise UserError(str(exc)) from None
    dtype = stored_dtype(base)
    tokenizer = AutoTokenizer.from_pretrained(base, config=config, trust_remote_code=False)
    texts = [r.text for r in load_texts(calibration or default_calibration_path())]
    with atomic_output_dir(out, force=False, inputs=[base]) as tmp:
        torch.manual_seed(seed)
        model = SpectraForCausalLM.from_pretrained(base, config=config, dtype=torch.float32)
        try:
            blocks = calibration_batches(tokenizer, texts, max_tokens=calibration_tokens, seed=seed)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        routers = model.routers()
        model.eval()
        with torch.no_grad():
            inputs = capture_inputs(routers, (lambda start=start: model(input_ids=blocks[start:start + 8], use_cache=False)
                                              for start in range(0, blocks.shape[0], 8)))
        cvs = [calibrate_bias(router, layer_inputs) for router, layer_inputs in zip(routers, inputs)]
        model.to(dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        generation = base / "generation_config.json"
        if generation.is_file() and not (tmp / generation.name).exists():
            (tmp / generation.name).write_bytes(generation.read_bytes())
    return cvs
