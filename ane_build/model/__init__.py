"""Llama models: the plain fp32 reference, and (later) the ANE-friendly export model."""
