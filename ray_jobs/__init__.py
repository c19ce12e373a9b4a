"""subject-ffhq's Ray job: planning, actor pools, retries, resume, progress, run manifests, reports."""
