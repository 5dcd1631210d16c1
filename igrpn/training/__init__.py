"""Training: the loop every detector trains with, the experiment runner, and the MONAI peer.

``loop`` (``train``: one run, resumable, its checkpoint and log), ``experiment`` (validation runs
recorded in docs/experiments.csv), ``peer`` (MONAI's 3D RetinaNet trained on the same data),
``distributed`` (torchrun data parallelism). Inference, evaluation and the figures never import
this package (docs/design.md §2).
"""
