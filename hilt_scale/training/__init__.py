"""Training: the run's config and CLI, DeepSpeed setup, the loop, checkpoints and the run's logs.

``loop.run(cfg)`` is the whole run; ``hilt_scale/train.py`` only parses and calls it.
"""
