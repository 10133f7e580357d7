"""geomlab.figures: plotly Figures from analysis results (analysis.json), and the HTML report.

    import geomlab.figures as gf
    a = gf.load("runs/demo/analysis/analysis.json")
    gf.accuracy_matrices(a).show()
    gf.sphere(a, "modx").show()

Every function takes the analysis object (the dict `python -m geomlab.analyze` writes, see
docs/analysis_schema.md) and returns a `plotly.graph_objects.Figure`; strategies sit side by side.
Any text that comes from the data (strategy, domain and checkpoint names, captions) is HTML-escaped.
"""
from .plots import (accuracy_matrices, deviation, figures, flips, forgetting_curves, load, rigid_share,
                    rotation_angles, rotation_spectrum, sphere, topology_drift)
from .report import render_report, write_report
from .summary import headline_numbers

__all__ = ["load", "accuracy_matrices", "forgetting_curves", "rotation_angles", "topology_drift", "rigid_share",
           "rotation_spectrum", "deviation", "flips", "sphere", "figures", "render_report", "write_report",
           "headline_numbers"]
