"""Exported programs and their lowering: saved programs, the lowering (our changes to ExecuTorch,
torch and coremltools internals), byte-reproducible Core ML payloads, and the Core ML programs
inside a .pte read without Core ML."""
