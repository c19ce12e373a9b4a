"""FastComposer training on streamed shards: loader, model, losses, loop, sampler (no Ray).

Data flows one way: shards (WebDataset tars) → :mod:`training.loader` (decode + per-sample
preprocessing of :mod:`training.preprocess`) → :mod:`training.collate` → :mod:`training.model`
(U-Net + fusion MLP + vision encoder, losses of :mod:`training.losses`) → :mod:`training.loop`
(optimizer, checkpoints), run on Ray Train workers by :mod:`ray_jobs.train`.
"""
