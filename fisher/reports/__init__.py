"""Reports: one module per paper figure, and every number quoted from the paper in one place.

Yan, Ho, Abbeel, "Natural Image Manipulation for Autoregressive Models using Fisher Scores".

* :mod:`fisher.reports.paper`: the paper's numbers (Figure 3a grid, Figure 3b / Figure 7 FID tables)
  and the seed papers' binarized-MNIST NLLs, as data.
* :mod:`fisher.reports.figure3a`: the projection density × dimension reconstruction grid (sec. 5.1,
  Figure 3a) as a markdown table and an annotated heat-map PNG.
* :mod:`fisher.reports.figure3b`: interpolation FID against α (Algorithm 1; Figure 3b on MNIST,
  Figure 7 on CelebA) as a markdown table and a PNG plot.
* :mod:`fisher.reports.layouts`: the image layouts of the interpolation strips (Figures 2 and 4) and
  the attribute-edit grids (Figure 5).
* :mod:`fisher.reports.run`: ``report.md`` of ``fisher run``, from the artifacts of a run.

Every function here is pure (records, arrays or artifact directories in; text, PNG bytes or uint8
arrays out). Like the rest of :mod:`fisher`, this package never imports ray (nor raycluster).
"""
