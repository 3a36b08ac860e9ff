"""The ground layer: errors, paths, processes and locks, integrity records, output.

Imports nothing of the kit; every other package may import it."""
