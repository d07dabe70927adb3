"""What we can tell about a program before a device runs it: the Neural Engine rules and lint,
Core ML's compute plan on a Mac, the decode cost, and quality against the fp32 reference."""
