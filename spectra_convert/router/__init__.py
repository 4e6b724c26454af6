"""Everything about SPECTRA routers outside the shipped runtime (docs/ARCHITECTURE.md, "Layers").

``find`` (routers in a model), ``tap`` (``RouterTap``: router inputs and choices through hooks),
``prototypes`` (expert-vector initialisation), ``calibrate`` (dual-bias calibration on hard top-k loads),
``metrics`` (balance and specialisation metrics, pure functions), ``loads`` (per-layer loads while training),
``oracle_fit`` (routers fitted to predict carved experts: oracle, ridge linear gate, SPECTRA router fit).
"""
