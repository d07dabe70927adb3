"""Weight quantization the quantize stage applies: palettes, and a GGUF's own blocks."""
