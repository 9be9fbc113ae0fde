"""``dplit sweep``: grids of epsilons x seeds x DP algorithms (and the non-DP twin), one run folder per cell.

``spec`` reads and validates the grid, ``cells`` expands it into named runs and their fit configs, ``run`` trains
them one by one (resumable), ``emit`` writes cluster jobs, and ``report`` compares the methods at equal epsilon.
"""
