"""The content-addressed store: stage keys (from the recipe, upstream keys, the code a stage can
run and its libraries), the local store, and the remote cache that mirrors it."""
