"""Training: one loop core (loop.py + step.py) that every task (tasks/) plugs into."""
