"""mapcompose's ablation grid (`cirlab ablate mapcompose`): 0, 100, 500 and 2000 synthetic triplets in stage II
(0: stage I only; every row at the 2000-triplet row's optimizer steps), visual injection, soft alignment and hard
negatives each off, exact-match-only triplets, and the reference kept out of hard-negative mining. Rows with the
same stage-I config share one stage I. Stage II overfits its few triplets, so a row reports the epoch of its best
val R@1 (`SELECT`)."""
ROWS = [*({"triplets": n} for n in (0, 100, 500, 2000)), {"visual_injection": False}, {"soft_align": False},
        {"hard_negatives": 0}, {"min_match": 1.0}, {"mine_reference": False}]
FIELDS = ("triplets", "visual_injection", "soft_align", "hard_negatives", "min_match", "mine_reference")
PIPELINE = {"triplets": 2000, "min_match": 0.8}  # fields of the zero-shot recipe, not of the model's config
SWEEP = ("triplets", "triplets_sweep.png", "synthetic triplets in stage II (0: stage I only)", True)
SELECT = "best_val"
