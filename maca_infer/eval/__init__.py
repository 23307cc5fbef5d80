"""Accuracy workflows (MMLU, C-Eval) against an OpenAI-compatible server."""
