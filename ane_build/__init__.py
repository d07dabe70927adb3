"""ane-build: YAML recipes -> cached doit stages -> ANE-friendly ExecuTorch programs."""
