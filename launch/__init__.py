"""Job launchers: run the same `python -m train.main` on one machine or many."""
