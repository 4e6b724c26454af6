"""Ablation / sweep studies: ``spectra-convert study`` (plan schema, runner, summary table, plots)."""

from .plan import Plan, Variant, load_plan, parse_plan
from .runner import StudyResult, read_results, run_study

__all__ = ["Plan", "StudyResult", "Variant", "load_plan", "parse_plan", "read_results", "run_study"]
