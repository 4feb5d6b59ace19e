"""The training loop and its plumbing.

``build`` turns a composed config into the datamodule, the LightningModule, callbacks, loggers and the Trainer;
``train`` and ``predict`` are the three modes ``run.py`` dispatches to (train, evaluate, predict); ``launch`` ties a
Hydra job to its DDP processes; ``checkpoints`` and ``model_record`` decide what a run starts from and what a
checkpoint carries; ``config_checks`` and ``data_fit`` reject a bad config or a model that does not fit its data
before anything runs; ``callbacks``, ``loggers``, ``progress``, ``summary``, ``visualize`` and ``quiet`` shape what a
run writes and shows. The model itself lives in ``mrcnn.modeling``, the data in ``mrcnn.data``.
"""
