"""End to end: A/B tests and shadow rollouts on the real stack, judged on live traffic.

One pipeline (iris_ab) keeps v1 in production throughout. Its challengers are trained on a file whose
versicolor and virginica labels are swapped: they win the offline gate on their own holdout and lose
live. As an A/B test (sticky by X-User-Id) the challenger loses Welch's test on feedback; then, with
the pipeline file switched to a shadow rollout, a second one is mirrored, disagrees with production,
and is aborted while no client ever sees one of its answers.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from flywheel.clients.api import Client
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.core import schema
from flywheel.platform import deployments, supervisor
from tests.e2e.stack_ops import (
    DEADLINE,
    HOLDOUT,
    TRAINING,
    airflow,
    csv_bytes,
    extra_pipeline,
    put,
    wait_first_served,
    wait_until,
)
from tests.e2e.test_live_rollouts import (
    SWAPPED,
    LiveTraffic,
    alias,
    deploy_runs,
    finished,
    new_rollout_running,
    version_tags,
)

pytestmark = pytest.mark.e2e

PIPELINE = "iris_ab"
AB = """
rollout:
  strategy: ab
  bake_seconds: 2
  ab: {split: 50, key: X-User-Id, min_samples: 60, alpha: 0.05}
"""
SHADOW = """
rollout:
  strategy: shadow
  bake_seconds: 2
  shadow: {min_requests: 60, max_disagreement: 0.2, then: bluegreen}
"""


@pytest.fixture(scope="module")
def ab(stack_settings):
    with extra_pipeline(stack_settings, PIPELINE, edit=lambda text: text + AB) as name:
        put(stack_settings, f"{name}/v1.csv", csv_bytes(TRAINING))
        first = wait_first_served(stack_settings, name)
        yield first["model"]["version"]


def roles_of(settings, users: list[str]) -> dict[str, str]:
    """Each user's arm, as the answer to a request carrying their X-User-Id says."""

    def ask(user: str) -> tuple[str, str]:
        with Client(settings) as client:
            r = client.http.post(f"/{PIPELINE}/predict", json={"inputs": [HOLDOUT[0][:4]]}, headers={"X-User-Id": user})
            assert r.status_code == 200, r.text
            return user, r.headers["x-model-role"]

    with ThreadPoolExecutor(8) as pool:
        return dict(pool.map(ask, users))


def test_an_ab_test_is_sticky_and_decided_by_a_stated_test(stack_settings, ab):
    production = ab
    users = [f"user-{i}" for i in range(1000)]
    with airflow(stack_settings) as api:
        before = deploy_runs(api, PIPELINE)
        put(stack_settings, f"{PIPELINE}/swapped.csv", csv_bytes([[*r[:4], SWAPPED.get(r[4], r[4])] for r in TRAINING]))
        wait_until(lambda: alias(stack_settings, schema.CANDIDATE, PIPELINE), DEADLINE, "a candidate")
        wait_until(
            lambda: "candidate" in roles_of(stack_settings, users[:20]).values(), DEADLINE, "the A/B test running"
        )
        first, second = roles_of(stack_settings, users), roles_of(stack_settings, users)
        assert first == second  # the same user, the same arm
        split = Counter(first.values())
        assert 400 <= split["candidate"] <= 600, split  # 50 % of 1,000 keys, within 6 standard deviations
        with Client(stack_settings) as client:  # no key, no assignment: production
            roles = {client.predict([HOLDOUT[0][:4]], PIPELINE).headers["x-model-role"] for _ in range(30)}
        assert roles == {"production"}
        with LiveTraffic(stack_settings, PIPELINE, user_ids=True) as traffic:
            run = wait_until(lambda: finished(api, before, PIPELINE), DEADLINE, "the A/B test decided")
        assert run["state"] == "failed", run
    candidate = str(int(production) + 1)
    assert traffic.failures == []
    tags = version_tags(stack_settings, candidate, PIPELINE)
    assert schema.AB_TEST in tags, tags  # else something ended the test before it decided: the tags say what
    result = json.loads(tags[schema.AB_TEST])
    print(f"A/B: {result}")
    assert result["decision"] == "production kept" and result["p_value"] < 0.05 and result["z"] < 0
    assert result["candidate"]["rows"] >= 60 and result["production"]["rows"] >= 60
    assert result["test"].startswith("Welch's z-test")
    assert version_tags(stack_settings, candidate, PIPELINE)[schema.ROLLOUT].startswith("aborted: A/B lost")
    assert alias(stack_settings, schema.PRODUCTION, PIPELINE) == production


def test_a_shadow_candidate_is_compared_and_never_seen(stack_settings, ab):
    production = alias(stack_settings, schema.PRODUCTION, PIPELINE)
    path = stack_settings.pipelines_dir / f"{PIPELINE}.yaml"
    path.write_text(path.read_text().replace(AB, SHADOW))
    with airflow(stack_settings) as api:
        before = deploy_runs(api, PIPELINE)
        with LiveTraffic(stack_settings, PIPELINE) as traffic:
            swapped = [[*r[:4], SWAPPED.get(r[4], r[4])] for r in TRAINING[5:] + TRAINING[:5]]
            put(stack_settings, f"{PIPELINE}/swapped-again.csv", csv_bytes(swapped))
            run = wait_until(lambda: finished(api, before, PIPELINE), DEADLINE, "the shadow rollout decided")
            time.sleep(2)
        assert run["state"] == "failed", run
    answered = traffic.by()
    print(f"answers by (version, role): {dict(answered)}")
    assert traffic.failures == []
    assert set(answered) == {(production, "production")}  # the client only ever saw production
    with MlflowAPI.connect(stack_settings) as mlflow:
        newest = max(mlflow.versions(PIPELINE), key=lambda v: int(v["version"]))
    reason = newest["tags"][schema.ROLLOUT]
    assert reason.startswith("aborted: it disagreed with production on"), reason
    assert alias(stack_settings, schema.PRODUCTION, PIPELINE) == production
    assert alias(stack_settings, schema.CANDIDATE, PIPELINE) is None


def test_a_shadow_candidate_that_fails_every_request_is_aborted_without_one_client_error(stack_settings, ab):
    """Its servers stop answering once it shadows: every mirrored copy fails, no client sees it."""
    production = alias(stack_settings, schema.PRODUCTION, PIPELINE)
    path = stack_settings.pipelines_dir / f"{PIPELINE}.yaml"
    waits = SHADOW.replace("min_requests: 60", "min_requests: 1000000")  # it never gets to pass
    path.write_text(path.read_text().replace(AB, waits).replace(SHADOW, waits))
    with airflow(stack_settings) as api:
        before = deploy_runs(api, PIPELINE)
        with LiveTraffic(stack_settings, PIPELINE) as traffic:
            put(stack_settings, f"{PIPELINE}/honest.csv", csv_bytes(TRAINING[7:] + TRAINING[:7]))
            state = wait_until(
                new_rollout_running(stack_settings, production, PIPELINE),
                DEADLINE,
                "the shadow rollout running",
                interval=0.5,
            )
            candidate = deployments.candidate(stack_settings, PIPELINE).deployment
            supervisor.rpc(stack_settings).stopProcessGroup(candidate.group)
            run = wait_until(lambda: finished(api, before, PIPELINE), DEADLINE, "the shadow rollout decided")
            time.sleep(2)
        assert run["state"] == "failed", run
    assert traffic.failures == []
    assert set(traffic.by()) == {(production, "production")}
    reason = version_tags(stack_settings, state.version, PIPELINE)[schema.ROLLOUT]
    assert reason.startswith("aborted: a candidate replica was not ready"), reason
    assert alias(stack_settings, schema.PRODUCTION, PIPELINE) == production
