"""Process plumbing every layer may use: the user's-mistake error, logs, memory, worker processes,
and how a command ends."""
