"""tmcir's ablation grid (`cirlab ablate tmcir`): the token-fusion threshold, absolute (a cosine; 1.0 merges
nothing) and relative (a quantile of each query's own candidate pairs: 0.0 merges every candidate), stage 2 straight
from the pretrained CLIP (no stage 1), and stage 1 on oracle pseudo-targets of several imperfection levels or with
the failure modes of real instruction editors. `PIPELINE` fields change the backbone a row starts from (its stage 1),
not the model's config; a row that names none takes these."""
THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)
QUANTILES = (0.0, 0.25, 0.5, 0.75)
ROWS = [*({"threshold": t} for t in THRESHOLDS),
        *({"threshold_mode": "relative", "threshold": q} for q in QUANTILES), {"stage1": False},
        *({"imperfection": p} for p in (0.0, 0.3, 0.6)), {"failures": "realistic"}]
FIELDS = ("threshold", "threshold_mode", "stage1", "imperfection", "failures")
PIPELINE = {"stage1": True, "imperfection": 0.1, "failures": "none"}
EDITOR_FAILURES = {"none": {}, "realistic": "REALISTIC_FAILURES"}  # names in editing/oracle.py
SWEEP = ("threshold", "threshold_sweep.png", "fusion threshold (cosine; 1.0 merges nothing)", False)
EXTRA_COLUMNS = {"merged text tokens": "merged_text_tokens"}  # header -> the training log's key
