"""Pre-launch checks and predictions for a run config on a topology, from a CPU host.

    topologies   names → chips, hosts, HBM, link bandwidths (imports no jax: launchers use it)
    check        run_preflight: mesh fit, exact per-device bytes, the step compiled for the target
    memory       the analytic activation estimate used when no target compiler ran
    report       the Report and its text / JSON forms

This file imports nothing so that `gemma_qat.preflight.topologies` stays jax-free.
"""
