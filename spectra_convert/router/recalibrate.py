"""Re-correcting every router's dual bias of a whole model after fine-tuning (finetune's closing step).

Why its own module: it applies both bias rules -- the hard-load balancing bias of ``calibrate`` for copied or
rerouted experts and ``oracle_fit``'s rule for carved ones (``carve_bias``) -- and ``oracle_fit`` itself
builds on ``calibrate``; here is the one place that uses both (docs/ARCHITECTURE.md, "Routing").
"""

from __future__ import annotations

import torch

from .calibrate import calibrate_bias_on_scores
from .find import find_routers
from .oracle_fit import calibrate_carved_bias_on_scores, carved_blocks, oracle_mass_via_forward, selection_cv
from .tap import RouterTap


@torch.no_grad()
def recalibrate_model_bias(model: torch.nn.Module, blocks: torch.Tensor, *, batch_size: int = 4) -> list[float]:
    """Re-correct every router's dual bias on hard top-k loads of ``blocks`` ``[B, T]`` (after fine-tuning).

    Fine-tuning moves the projector, GRU and prototypes, which shifts routing faster than the in-training
    bias updates follow (measured on SmolLM2: held-out CV 0.04 -> 0.15 in 20 router steps). Training therefore
    ends with a hard-load correction; this is it. Only each router's selection scores are kept (E floats
    a token), so many tokens fit: on SmolLM2 8x a bias corrected on 8k training tokens left held-out CV at
    0.077, on 54k tokens 0.046. A router of a carved block gets what the converter gives it
    (``calibrate_carved_bias``) under the rule it was carved with (knob ``carve_bias``, read by the router): the
    whole balancing bias, or its strongest share that keeps oracle recall on the last eighth of ``blocks``.
    Returns the per-router load CV of the bias it set, on ``blocks``.
    """
    routers = find_routers(model)
    scores: dict[int, list[torch.Tensor]] = {id(r): [] for r in routers}
    carved = {id(router): block for block in carved_blocks(model) for router in find_routers(block.gate)}
    masses: dict[int, list[torch.Tensor]] = {key: [] for key in carved}

    def collect_mass(router: torch.nn.Module, args: tuple, _output: object) -> None:
        # inside the block's forward, where a sharded model's expert weights are gathered; a LoRA counts (run_experts)
        hidden = args[0].reshape(-1, args[0].shape[-1])
        masses[id(router)].append(oracle_mass_via_forward(carved[id(router)].experts, hidden, router.num_experts))

    handles = [router.register_forward_hook(collect_mass) for router in routers if id(router) in carved]
    was_training = model.training
    model.eval()
    try:
        # whole forwards (no early stop): every rank of a sharded model must run the same collectives
        with RouterTap(routers, inputs=True, outputs=False) as tap:
            for start in range(0, blocks.shape[0], batch_size):
                model(input_ids=blocks[start : start + batch_size], use_cache=False)
                # PEFT keeps a frozen original beside each trained router: only the routers that ran count
                for router, entry in zip(routers, tap.take(partial=True)):
                    if entry:
                        scores[id(router)].append(router.selection_scores(entry["inputs"].float()))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    cvs = []
    for router in (r for r in routers if scores[id(r)]):
        logits = torch.cat(scores[id(router)])
        if id(router) not in carved:
            cvs.append(calibrate_bias_on_scores(router, logits, seq_len=blocks.shape[1]))
            continue
        calibrate_carved_bias_on_scores(router, logits, torch.cat(masses[id(router)]), blocks.shape[1],
                                        rule=router.carve_bias)
        selected = (logits + router.dual_bias.float()).topk(router.top_k, dim=-1).indices
        cvs.append(selection_cv(selected, router.num_experts))
    return cvs
