"""Plug-ins that put gipo-core's objectives into RL trainers: one module per trainer, imported on demand.

    gipo_core.integrations.verl      verl's policy-loss registry   (pip install "gipo-core[verl]")
    gipo_core.integrations.trl       TRL's GRPOTrainer              (pip install "gipo-core[trl]")
    gipo_core.integrations.torchrl   a torchrl LossModule           (pip install "gipo-core[torchrl]")

Nothing here is imported by ``gipo_core`` itself, and no trainer is imported until its module is.
"""
