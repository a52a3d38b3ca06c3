"""The LoRA paper's E2E NLG study on this code: decoding and scoring (evaluation.py,
metrics.py, wordnet.py) and the experiment that trains every method and writes the table
(experiment.py)."""
