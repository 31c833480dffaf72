"""Measurement tools: perplexity / agreement with a reference (eval) and routing traces with the PC-MoE locality
observations (trace)."""
from moetandem.analysis.eval import EvalResult, evaluate, evaluate_ids
from moetandem.analysis.trace import Trace, recording, trace, trace_ids

__all__ = ["EvalResult", "Trace", "evaluate", "evaluate_ids", "recording", "trace", "trace_ids"]
