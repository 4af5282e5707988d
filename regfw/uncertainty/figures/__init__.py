"""The uncertainty figures, drawn with matplotlib off the training thread.

* :mod:`~regfw.uncertainty.figures.calibration`: the reliability diagram (classification) and the
  interval-coverage figure (regression);
* :mod:`~regfw.uncertainty.figures.selective`: the referral and risk-coverage curves;
* :mod:`~regfw.uncertainty.figures.histograms`: the uncertainty-score histogram and the
  in- against out-of-distribution score histograms;
* :mod:`~regfw.uncertainty.figures.canvas`: what every figure shares (a ``Figure`` on the Agg
  canvas, never pyplot; colours; the legend outside the axes);
* :mod:`~regfw.uncertainty.figures.labels`: what each uncertainty score is called on an axis;
* :mod:`~regfw.uncertainty.figures.files`: writing a figure as SVG or PNG by the file's suffix;
* :mod:`~regfw.uncertainty.figures.jobs`: the MC callback's figures, collected on the training
  thread and drawn on a background one.

The figure modules (and ``jobs``, which draws with them) import matplotlib; ``files`` and
``labels`` do not. Nothing here is imported by ``import regfw`` or the command line's start.
"""
