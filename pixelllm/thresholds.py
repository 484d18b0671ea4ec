"""The task defaults measured on the shapes world's held-out split (docs/model_card.md, "Scores").

Here, apart from ``pixelllm.tasks``, so that ``pixelllm --help`` shows them without loading PyTorch.
``scripts/score_thresholds.py`` measures them again for any checkpoint.
"""

LOCATE_MIN_SCORE = 0.01
"""A referring expression whose score is below this is not found (``Predictor.find_batch``)."""
DENSECAP_MIN_SCORE = 0.4
"""Dense captions keep the regions whose proposal score is at least this."""
