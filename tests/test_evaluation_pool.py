"""The Ray evaluation pool refuses more actors than the cluster can place (it would wait forever)."""

from __future__ import annotations

import pytest

from ray_jobs.evaluation import EvaluationPoolError, run_on_ray


def test_more_workers_than_the_cluster_can_place_is_refused_at_once(ray_local):
    with pytest.raises(EvaluationPoolError, match=r"--workers 64: each evaluation actor takes one CPU, and the Ray "
                                                  r"cluster at local has \d+"):
        next(run_on_ray(None, [], "local", workers=64))
