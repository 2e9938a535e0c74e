"""Training, calibration, data synthesis and evaluation for the `provenance` library; not installed with it.

Run from the repository root (`python -m training.calibrate`, `python training/calibrate.py`); tests import it as
`training.*` (pytest puts the repository root on sys.path). Nothing in `provenance/` imports this package.
"""
