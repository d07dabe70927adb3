"""The release bundle: its README for app developers, and its verification."""
