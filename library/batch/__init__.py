"""Batch runs: the run queue behind scripts/train_queue.sh / .ps1 and the TensorBoard launcher's folders."""
