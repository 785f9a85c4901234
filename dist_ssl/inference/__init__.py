"""Sharded pseudo-labeling and selection: turning a huge unlabeled pool into training data.

`pseudo_label` predicts every sample of a pool exactly once on any number of processes,
`select` keeps the samples a policy wants (per-class top-K, threshold, sample rate, all) as a
labeled split, `report` computes and logs their statistics, and `jobs` holds what both sharded jobs
share (contiguous work blocks, atomic files, decisions taken by rank 0).
"""
