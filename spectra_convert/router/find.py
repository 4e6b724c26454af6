"""Finding routers in a model: SPECTRA routers by class name, a parent MoE's own gates by module path.

SPECTRA routers are matched by class name (``SpectraRouter``), never by import: a converted folder loads its
own copy of ``modeling_spectra.py`` through ``trust_remote_code``, so the class object differs from ours while
the contract does not (docs/ARCHITECTURE.md, "The router contract").
"""

from __future__ import annotations

import re

from torch import nn

ROUTER_CLASS = "SpectraRouter"

_PARENT_GATE = re.compile(r"\.(\d+)\.mlp\.gate$")


def is_router(module: nn.Module) -> bool:
    """True for a SPECTRA router, whichever copy of the runtime defined its class."""
    return type(module).__name__ == ROUTER_CLASS


def find_routers(model: nn.Module) -> list[nn.Module]:
    """The model's SPECTRA routers in layer order. Within a layer, module order is kept (a stable sort), so
    PEFT's trained copy of a router comes after the frozen original it wraps."""
    routers = [module for module in model.modules() if is_router(module)]
    return sorted(routers, key=lambda router: getattr(router, "layer_idx", 0))


def parent_gates(model: nn.Module) -> list[nn.Module]:
    """A MoE parent's original routers: the modules at ``...mlp.gate`` (Mixtral, Qwen-MoE, OLMoE), layer order."""
    found = []
    for name, module in model.named_modules():
        match = _PARENT_GATE.search(name)
        if match:
            found.append((int(match.group(1)), module))
    return [module for _, module in sorted(found, key=lambda item: item[0])]
