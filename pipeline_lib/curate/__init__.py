"""Phase 2, curate: near-duplicates, manual review, the dataset audit and the group-aware split."""
