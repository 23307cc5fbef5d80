"""Benchmarks (scripts, never tests).

    python -m maca_infer.bench            # the op suite: Markdown table + PNG plot
    maca-infer bench ops|generation|serving

Every op reports the bytes it must move and its FLOPs against the measured
figure; on a host with no accelerator, launches and host syncs per decode step
and host microseconds per step.
"""
