"""Fine-tuning of SPECTRA models: router-only or LoRA + routers, on accelerate, resumable and distributed.

``data`` packs text into blocks with a seed/step-pure order, ``modes`` says what trains, ``trainer`` runs the
accelerate loop, ``state`` handles checkpoints and the atomic output folder, ``api.finetune`` ties them together.
"""

from .api import FinetuneResult, finetune

__all__ = ["FinetuneResult", "finetune"]
