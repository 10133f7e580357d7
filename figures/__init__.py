"""geomlab.figures: plotly Figures from analysis results (analysis.json), and the HTML report.

    import geomlab.figures as gf
    a = gf.load("runs/demo/analysis/analysis.json")
    gf.accuracy_matrices(a).show()
    gf.sphere(a, "modx").show()

Every function takes the analysis object (the dict `python -m geomlab.analyze` writes, see
docs/analysis_schema.md) and returns a `plotly.graph_objects.Figure`; strategies sit side by side.
The functions of figures/study.py (`accuracy_mean`, `forgetting_bands`, `geometry_bands`,
`retention_plasticity`, `geometry_vs_forgetting`, ...) take a study instead: the analysis.json of
several seeds ("geomlab.study/1"). `write_report` writes either kind's report.
Any text that comes from the data (strategy, domain and checkpoint names, captions) is HTML-escaped.
"""
from .plots import (accuracy_matrices, deviation, figures, flips, forgetting_curves, load, rigid_share,
                    rotation_angles, rotation_spectrum, sphere, topology_drift, zeroshot_accuracy)
from .report import render_report, write_report
from .study import (accuracy_mean, forgetting_bands, geometry_bands, geometry_vs_forgetting, retention_plasticity,
                    study_figures, zeroshot_bands)
from .summary import headline_numbers

__all__ = ["load", "accuracy_matrices", "forgetting_curves", "zeroshot_accuracy", "rotation_angles", "topology_drift", "rigid_share",
           "rotation_spectrum", "deviation", "flips", "sphere", "figures", "render_report", "write_report",
           "headline_numbers", "accuracy_mean", "forgetting_bands", "zeroshot_bands", "geometry_bands",
           "retention_plasticity", "geometry_vs_forgetting", "study_figures"]
