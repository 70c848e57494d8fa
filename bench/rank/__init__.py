"""What runs inside each rank process: the training worker, its train loop, where the rank sits (topology), the
optimizer, and the runtime every rank shares (start, logs, hand-in, exit). Never imports Hydra."""
