"""Framework adapters. Each one imports its framework lazily; adapters never
import each other."""
