"""Where checkpoints come from: pinned https downloads and the Hugging Face Hub."""
