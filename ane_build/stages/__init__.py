"""One module per pipeline stage; each exposes ``run(inputs, params, out_dir)`` and imports no doit."""
