"""What the strategies, the checks, the planner and the ranks share about parallel training: where a rank sits
and the parallel degrees (`topology`), and the optimizer every strategy builds (`optim`)."""
