"""Reports: plots of cost and accuracy (``xbm.report.plots``).

Kept import-light on purpose: the ``xbm`` command probes this package for extensions at start-up,
and matplotlib is only imported when a plot is drawn.
"""
