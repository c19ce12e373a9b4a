"""Evaluation of a trained checkpoint, as in FastComposer's paper (§5.1-5.3): identity preservation
(MTCNN + FaceNet) and prompt consistency (CLIP), single- and multi-subject, with a text-only Stable
Diffusion baseline and a leak check against the training shards.

``protocol`` subjects, prompts, seeds and the image plan; ``scoring`` the two metrics; ``worker``
generation + scoring of a batch (in-process or in a Ray actor, see ``ray_jobs.evaluation``);
``leak`` the leak check; ``report`` the Parquet table, ``summary.json`` and ``evaluation.html``;
``runner`` the whole run. ``subject-ffhq evaluate`` (:mod:`cli.evaluate`) drives it.
"""
