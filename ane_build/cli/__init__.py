"""The ane-build commands (main.py), among them the seed's export.py and run.py flags."""
