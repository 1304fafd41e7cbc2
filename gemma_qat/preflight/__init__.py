"""Pre-launch checks and predictions for a run config on a topology, from any host.

    topologies      names → chips, hosts, HBM (imports no jax: launchers use it)
    check           run_preflight: mesh fit, exact per-device bytes, the step compiled for the target
    compilers       the target's own compiler without its chips: libtpu topologies, GPU cluster topologies
    memory          the analytic activation estimate used when no target compiler ran
    layout          argument bytes as the compiler laid them out (TPU tiles)
    hlo, replica_groups, collectives   every collective of a compiled step: kind, dtype, bytes, source
    step_model, performance            predicted step time, tokens/s and MFU (chip table, calibration)
    report          the Report and its text / JSON forms

This file imports nothing so that `gemma_qat.preflight.topologies` stays jax-free.
"""
