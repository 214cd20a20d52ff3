"""search: the Ray Tune + Optuna + ASHA sweep over tumorseg trainings (see search/run.py)."""
