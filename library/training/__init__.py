"""The one training loop every trainer shares, and what it is made of: noise and loss, optimizers and
LR schedules, the step plan, checkpoints and resume, progress bar and TensorBoard logs, devices and dtypes.
"""
