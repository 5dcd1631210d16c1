"""Scoring trained models: the metrics of paper §3, the rows they score, the tables and the report.

``metrics`` (d-mean, hit rates, AP, mIoU, bootstrap intervals), ``answers`` (ground truth and the
selected answers as rows), ``runs`` (every trained configuration predicted on the test split),
``tables`` (Table 1, Table 2, the claims, beside the paper's numbers), ``report`` (REPORT.md).
Nothing here imports the training code (docs/design.md §2).
"""
