"""Evaluation with the paper's protocol through clip-benchmark's metric code: zero-shot classification and retrieval,
linear probe (CPU or GPU), robustness; suites in eval/suites, the paper's tables in eval/reference."""
