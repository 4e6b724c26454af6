"""Validation of a SPECTRA model's routing on held-out text (``api.validate``).

The defaults live here, not in ``api``: the ``validate`` CLI shell needs them to build its options, and importing
``api`` pulls in torch (~1.5 s) — which ``spectra-convert --help`` (it lists every verb) must not pay.
"""

#: total real tokens routed by default
DEFAULT_MAX_TOKENS = 16384
#: each text is truncated to this many tokens by default
DEFAULT_MAX_LENGTH = 512
