"""The trace engine: sites per architecture (adapters), heads, and the one driver that runs edits."""
