"""Scanning: finding layouts below the roots (:mod:`.discovery`), reading them in worker processes
(:mod:`.workers`), and the pass that feeds the store's writer (:mod:`.scanner`).

Importing this package imports nothing: ``find`` takes the no-change walk of :mod:`.proof` on the
lookup path, which is standard library only.
"""
