"""Live rollouts: a challenger that won offline is judged on live traffic before it takes over.

The training gate registered the version as `candidate` (the pipeline's `rollout.strategy` is not
bluegreen); the rollout task started its replicas on the idle colour and proved them (rollout.py);
`begin` gives it traffic, and `judge` decides, step by step, from what production and the candidate
did over the same window:

- requests, 5xx ratio and p99 per version: Prometheus, from the Bentos' own metrics;
- the live score on feedback labels, and the shadow copies' disagreement: the inference service;
- the candidate's replicas: every one must stay ready.

Strategies (core/pipelines.py `Rollout`):
- **shadow**: Nginx mirrors (a share of) requests to the candidate, whose answers are discarded;
  once enough are compared it goes on (`shadow.then`: canary, or bluegreen: promoted at once).
- **canary**: Nginx splits requests by weight, step by step (`steps`), each step baked for at least
  `bake_seconds` and `min_requests` candidate answers before the guardrails decide.
- **ab**: a sticky split by a request header; once both arms have `min_samples` labelled answers,
  Welch's z-test on the per-row loss (0/1 for accuracy, squared error for regression; two-sided,
  normal approximation) at `alpha` decides; guardrails still apply meanwhile.

A failed guardrail sends all traffic back to production at once, stops the candidate and says why
on the version's tags; reaching 100 % (or winning the test) makes it `production`. The state is a
file per pipeline (`rollouts/<p>.json`): the judge (deploy_<p>'s `judge` task, deferred between
decisions), `flywheel rollout --promote|--abort` and the events bridge's watchdog act on it, so any
process may die mid-rollout and the next one to look carries on from it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field

import httpx

from flywheel.clients import inference, prometheus
from flywheel.clients.mlflow_rest import MlflowAPI
from flywheel.core import schema
from flywheel.core.pipelines import Pipeline, Rollout
from flywheel.core.settings import Settings, write_private
from flywheel.platform import deployments, routes
from flywheel.platform.deployments import Deployment, Traffic
from flywheel.serving.rollout import DRAIN_SECONDS, aliases_name_what_serves, mark

RUNNING, PROMOTED, ABORTED = "running", "promoted", "aborted"
POLL_SECONDS = (2.0, 10.0)  # the judge looks again within this range of seconds
# A rollout whose judge has not looked for this long has nobody deciding: the bridge's watchdog ends it.
ORPHANED_SECONDS = 300.0
NOT_READY_SECONDS = 20.0  # a candidate replica not ready for this long fails the rollout
BLIND_SECONDS = 120.0  # a rollout that cannot read its figures for this long ends with production serving
MAX_STEP_BAKES = 10  # a step waits for feedback at most this many bake times (a minute at least)


@dataclass
class State:
    pipeline: str
    strategy: str
    version: str  # the candidate
    baseline: str  # what served when the rollout began
    phase: str  # shadow | canary | ab
    step: int  # index into the canary's steps
    weight: int  # % of requests the candidate answers (0 while it only shadows)
    started_at: float
    step_started_at: float
    heartbeat: float
    status: str = RUNNING
    reason: str = ""
    requested: str = ""  # promote | abort, by hand
    not_ready_since: float = 0.0
    blind_since: float = 0.0  # since when the figures could not be read
    history: list[dict] = field(default_factory=list)
    # Once decided: whether what follows is done (settle), and the colour that is to stop.
    settled: bool = True
    stops: str = ""

    @property
    def summary(self) -> str:
        share = f"{self.weight}% of requests" if self.phase != "shadow" else "mirrored requests"
        return f"{self.strategy}: {self.phase} step {self.step + 1}, v{self.version} takes {share}"


@dataclass(frozen=True)
class Verdict:
    """What the judge concluded: look again in `wait` seconds, or the rollout ended (`status`)."""

    status: str
    wait: float = 0.0
    reason: str = ""
    deployment: dict | None = None


def _path(settings: Settings, pipeline: str):
    return settings.state / "rollouts" / f"{pipeline}.json"


def load(settings: Settings, pipeline: str) -> State | None:
    path = _path(settings, pipeline)
    return State(**json.loads(path.read_text())) if path.exists() else None


def save(settings: Settings, state: State) -> None:
    path = _path(settings, state.pipeline)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, json.dumps(asdict(state), indent=1))


def traffic(config: Rollout, phase: str, weight: int) -> Traffic:
    if phase == "shadow":
        return Traffic(mode="mirror", sample=config.shadow_sample)
    if phase == "ab":
        return Traffic(mode="sticky", weight=weight, key=config.ab_key)
    return Traffic(mode="split", weight=weight)


def first_phase(config: Rollout) -> tuple[str, int]:
    if config.strategy == "shadow":
        return "shadow", 0
    if config.strategy == "ab":
        return "ab", config.ab_split
    return "canary", config.steps[0]


def begin(settings: Settings, pipeline: Pipeline, candidate: Deployment, log=print) -> State:
    """Give the proven candidate its first share of traffic, and write down the rollout."""
    production = deployments.current(settings, pipeline.name)
    phase, weight = first_phase(pipeline.rollout)
    now = time.time()
    state = State(
        pipeline.name,
        pipeline.rollout.strategy,
        candidate.version,
        production.version if production else "",
        phase,
        0,
        weight,
        now,
        now,
        now,
    )
    save(settings, state)
    candidate.timings["live"] = now  # its first share of traffic (or of mirrored copies)
    deployments.record_candidate(settings, pipeline.name, candidate, traffic(pipeline.rollout, phase, weight))
    routes.sync(settings)
    _tag(settings, pipeline.name, candidate.version, f"{RUNNING}: {state.summary}")
    log(f"rollout of v{candidate.version} begins: {state.summary}")
    return state


def request(settings: Settings, pipeline: str, action: str) -> State:
    """`flywheel rollout <p> --promote|--abort`: the judge acts on it at its next look."""
    state = load(settings, pipeline)
    if state is None or state.status != RUNNING:
        raise ValueError(f"no rollout of {pipeline} is running")
    state.requested = action
    save(settings, state)
    return state


# --- the figures ------------------------------------------------------------------------------------------


def _one(settings: Settings, promql: str) -> float | None:
    series = prometheus.query(settings, promql)
    return prometheus.value(series[0]) if series else None


def serving_figures(settings: Settings, pipeline: str, version: str, seconds: float) -> dict:
    """Requests, 5xx ratio and p99 (ms) of one version over the last `seconds`, from its Bentos' metrics."""
    window = f"{max(10, int(seconds))}s"
    sel = f'pipeline="{pipeline}", model_version="{version}", endpoint="/predict"'
    total = _one(settings, f"sum(increase(bentoml_service_request_total{{{sel}}}[{window}]))") or 0.0
    errors = _one(
        settings, f'sum(increase(bentoml_service_request_total{{{sel}, http_response_code=~"5.."}}[{window}]))'
    )
    failed = _one(
        settings, f'sum(increase(bentoml_service_request_total{{{sel}, http_response_code!~"2.."}}[{window}]))'
    )
    p99 = _one(
        settings,
        "histogram_quantile(0.99, sum by (le) "
        f"(rate(bentoml_service_request_duration_seconds_bucket{{{sel}}}[{window}])))",
    )
    return {
        "requests": round(total),
        "error_ratio": (errors or 0.0) / total if total else 0.0,
        "failure_ratio": (failed or 0.0) / total if total else 0.0,
        "p99_ms": None if p99 is None else p99 * 1000,
    }


def figures(settings: Settings, pipeline: Pipeline, state: State) -> dict:
    seconds = time.time() - state.step_started_at
    live = inference.live(settings, pipeline.name, state.step_started_at)
    arms = {}
    for role, version in (("production", state.baseline), ("candidate", state.version)):
        fig = serving_figures(settings, pipeline.name, version, seconds) if version else {}
        labelled = (
            live["versions"]
            .get(version, {})
            .get("shadow" if role == "candidate" and state.phase == "shadow" else role, {})
        )
        arms[role] = {"version": version, **fig, "live": labelled}
    return {"seconds": round(seconds, 1), "arms": arms, "shadow": live["shadow"], "metric": live["metric"]}


# The live-score guardrail fails on a drop beyond `live_score_drop` that is also no accident of the
# few labelled rows a step has: the candidate's per-row loss is higher than production's at this
# level (Welch, one-sided). Two equally good models differ by more than 0.05 accuracy on 20 rows
# often enough to roll back a good challenger; a bad one (0.38 against 0.98) is significant on 20.
LIVE_SCORE_ALPHA = 0.05


def _drop(pipeline: Pipeline, production: float, candidate: float) -> float:
    """How much worse the candidate's live score is (positive: worse), whichever way the metric points."""
    return production - candidate if pipeline.higher_is_better else candidate - production


def guardrails(pipeline: Pipeline, config: Rollout, fig: dict, phase: str = "canary") -> list[str]:
    """Every guardrail the candidate fails, with the figures, against production over the same window.
    In an A/B test the live score is what the test decides on, so only the serving guardrails apply."""
    prod, cand = fig["arms"]["production"], fig["arms"]["candidate"]
    failed = []
    if cand.get("requests"):
        if cand["error_ratio"] - prod.get("error_ratio", 0.0) > config.error_ratio:
            failed.append(
                f"error ratio {cand['error_ratio']:.3f} against production's {prod.get('error_ratio', 0.0):.3f} "
                f"(guardrail +{config.error_ratio})"
            )
        slower = (cand.get("p99_ms") or 0.0) - (prod.get("p99_ms") or 0.0)
        if cand.get("p99_ms") is not None and prod.get("p99_ms") is not None and slower > config.p99_ms:
            failed.append(
                f"p99 {cand['p99_ms']:.1f} ms against production's {prod['p99_ms']:.1f} ms "
                f"(guardrail +{config.p99_ms} ms)"
            )
    c, p = cand["live"], prod["live"]
    if phase != "ab" and c.get("rows", 0) >= config.min_feedback and p.get("rows", 0) >= config.min_feedback:
        drop = _drop(pipeline, p["score"], c["score"])
        test = welch(c, p)
        worse = test["z"] < 0 and test["p_value"] / 2 < LIVE_SCORE_ALPHA  # one-sided: the candidate loses more
        if drop > config.live_score_drop and worse:
            failed.append(
                f"live {pipeline.metric} {c['score']:.3f} on {c['rows']} labelled rows against production's "
                f"{p['score']:.3f} on {p['rows']} (guardrail: a drop of at most {config.live_score_drop}; "
                f"worse per row at p = {test['p_value'] / 2:.2g}, one-sided)"
            )
    return failed


def welch(candidate: dict, production: dict) -> dict:
    """Welch's z-test on the mean per-row loss of the two arms (two-sided, normal approximation)."""
    n1, n2 = candidate["rows"], production["rows"]
    m1, m2 = candidate["loss_mean"], production["loss_mean"]
    se = math.sqrt(candidate["loss_var"] / n1 + production["loss_var"] / n2) if n1 and n2 else 0.0
    # Positive: the candidate loses less.
    z = (0.0 if m1 == m2 else math.copysign(math.inf, m2 - m1)) if se == 0.0 else (m2 - m1) / se
    return {
        "test": "Welch's z-test on the per-row loss, two-sided",
        "z": z,
        "p_value": math.erfc(abs(z) / math.sqrt(2)),
    }


# --- the decisions ------------------------------------------------------------------------------------


def _replicas_ready(settings: Settings, candidate: Deployment) -> bool:
    for port in candidate.ports:
        try:
            if httpx.get(f"{settings.url(port)}/readyz", timeout=3).status_code != 200:
                return False
        except httpx.HTTPError:
            return False
    return True


def judge(settings: Settings, pipeline: Pipeline, log=print) -> Verdict:
    """Look at the rollout once: act on a request by hand, check the guardrails, step or end it."""
    state = load(settings, pipeline.name)
    if state is None:
        return Verdict(PROMOTED, reason="no rollout: nothing to judge")
    if state.status != RUNNING:
        if not state.settled:
            return settle(settings, pipeline, state, log)
        return Verdict(state.status, reason=state.reason, deployment=deployment_extra(settings, pipeline.name))
    now = time.time()
    state.heartbeat = now
    config = pipeline.rollout
    found = deployments.candidate(settings, pipeline.name)
    if found is None:
        return abort(settings, pipeline, state, "its candidate record is gone", log)
    candidate = found.deployment
    if state.requested == "abort":
        return abort(settings, pipeline, state, "aborted by hand", log)
    if state.requested == "promote":
        return promote(settings, pipeline, state, "promoted by hand", log)
    if not _replicas_ready(settings, candidate):
        state.not_ready_since = state.not_ready_since or now
        if now - state.not_ready_since > NOT_READY_SECONDS:
            return abort(
                settings, pipeline, state, f"a candidate replica was not ready for {NOT_READY_SECONDS:.0f} s", log
            )
    else:
        state.not_ready_since = 0.0
    try:
        fig = figures(settings, pipeline, state)
    except httpx.HTTPError as exc:  # Prometheus or the inference service away: no figures, no decision
        state.blind_since = state.blind_since or now
        if now - state.blind_since > BLIND_SECONDS:
            return abort(settings, pipeline, state, f"no figures for {now - state.blind_since:.0f} s: {exc}", log)
        save(settings, state)
        return Verdict(RUNNING, wait=POLL_SECONDS[1], reason=f"figures unavailable: {exc}")
    state.blind_since = 0.0
    failed = guardrails(pipeline, config, fig, state.phase)
    if state.phase == "shadow":
        shadow = fig["shadow"]
        if fig["arms"]["candidate"].get("failure_ratio", 0.0) > config.error_ratio:
            failed.append(
                f"the candidate failed {fig['arms']['candidate']['failure_ratio']:.1%} of the mirrored requests"
            )
        if (
            shadow["disagreement"] is not None
            and shadow["requests"] >= config.shadow_min_requests
            and shadow["disagreement"] > config.shadow_max_disagreement
        ):
            failed.append(
                f"it disagreed with production on {shadow['disagreement']:.1%} of {shadow['rows']} mirrored rows "
                f"(at most {config.shadow_max_disagreement:.0%})"
            )
    if failed:
        state.history.append(
            {"at": now, "phase": state.phase, "weight": state.weight, "figures": fig, "failed": failed}
        )
        return abort(settings, pipeline, state, "; ".join(failed), log)
    ready, waiting_for = step_done(config, state, fig, now)
    if not ready:
        save(settings, state)
        return Verdict(RUNNING, wait=_poll(config, state, now), reason=waiting_for)
    state.history.append({"at": now, "phase": state.phase, "weight": state.weight, "figures": fig, "passed": True})
    if state.phase == "ab":
        return _decide_ab(settings, pipeline, state, fig, log)
    if state.phase == "shadow" and config.shadow_then == "bluegreen":
        return promote(settings, pipeline, state, f"shadow passed: {_shadow_words(fig)}", log)
    if state.phase == "shadow":
        state.phase, state.step, state.weight = "canary", 0, config.steps[0]
    elif state.step + 1 < len(config.steps):
        state.step, state.weight = state.step + 1, config.steps[state.step + 1]
    else:
        return promote(
            settings, pipeline, state, f"every step passed ({', '.join(f'{s}%' for s in config.steps)})", log
        )
    state.step_started_at = now
    save(settings, state)
    deployments.record_candidate(settings, pipeline.name, candidate, traffic(config, state.phase, state.weight))
    routes.sync(settings)
    _tag(settings, pipeline.name, state.version, f"{RUNNING}: {state.summary}")
    log(f"v{state.version}: {state.summary}")
    return Verdict(RUNNING, wait=POLL_SECONDS[0], reason=state.summary)


def step_done(config: Rollout, state: State, fig: dict, now: float) -> tuple[bool, str]:
    baked = now - state.step_started_at
    cand = fig["arms"]["candidate"]
    if baked < config.bake_seconds:
        return False, f"baking: {baked:.0f} of {config.bake_seconds:.0f} s"
    if state.phase == "shadow":
        if fig["shadow"]["requests"] < config.shadow_min_requests:
            return False, f"{fig['shadow']['requests']} of {config.shadow_min_requests} mirrored requests compared"
        return True, ""
    if state.phase == "ab":
        rows = [fig["arms"][arm]["live"].get("rows", 0) for arm in ("production", "candidate")]
        if min(rows) < config.ab_min_samples:
            return False, f"labelled rows per arm {rows}, need {config.ab_min_samples}"
        return True, ""
    if cand.get("requests", 0) < config.min_requests:
        return False, f"{cand.get('requests', 0)} of {config.min_requests} candidate requests"
    # While feedback flows, a step waits for enough of it on the candidate: the live score is the
    # guardrail that catches a model that wins offline and loses live. A pipeline that gets no
    # feedback is judged on its serving figures; one whose feedback trickles waits MAX_STEP_BAKES bakes.
    labelled = cand["live"].get("rows", 0)
    flowing = labelled or fig["arms"]["production"]["live"].get("rows", 0)
    if flowing and labelled < config.min_feedback and baked < max(MAX_STEP_BAKES * config.bake_seconds, 60):
        return False, f"{labelled} of {config.min_feedback} labelled candidate answers"
    return True, ""


def _poll(config: Rollout, state: State, now: float) -> float:
    remaining = config.bake_seconds - (now - state.step_started_at)
    return min(POLL_SECONDS[1], max(POLL_SECONDS[0], remaining))


def _shadow_words(fig: dict) -> str:
    s = fig["shadow"]
    share = "n/a" if s["disagreement"] is None else f"{s['disagreement']:.1%}"
    return f"{s['requests']} mirrored requests, disagreement {share}"


def _decide_ab(settings: Settings, pipeline: Pipeline, state: State, fig: dict, log) -> Verdict:
    config = pipeline.rollout
    cand, prod = fig["arms"]["candidate"]["live"], fig["arms"]["production"]["live"]
    result = {**welch(cand, prod), "alpha": config.ab_alpha, "candidate": cand, "production": prod}
    better = result["z"] > 0
    significant = result["p_value"] < config.ab_alpha
    result["decision"] = "candidate wins" if significant and better else "production kept"
    _tag(settings, pipeline.name, state.version, json.dumps(result, default=str)[:4900], key=schema.AB_TEST)
    words = (
        f"{result['test']}: z={result['z']:.2f}, p={result['p_value']:.4f} (alpha {config.ab_alpha}); "
        f"live {pipeline.metric} candidate {cand['score']:.3f} on {cand['rows']} rows, "
        f"production {prod['score']:.3f} on {prod['rows']}"
    )
    if significant and better:
        return promote(settings, pipeline, state, f"A/B won: {words}", log)
    if not significant and max(cand["rows"], prod["rows"]) < config.ab_max_samples:
        save(settings, state)
        return Verdict(RUNNING, wait=POLL_SECONDS[1], reason=f"not significant yet: {words}")
    return abort(settings, pipeline, state, f"A/B lost or undecided: {words}", log)


def promote(settings: Settings, pipeline: Pipeline, state: State, why: str, log=print) -> Verdict:
    """The candidate takes all traffic and becomes `production`; the old colour drains and stops."""
    candidate = deployments.candidate(settings, pipeline.name).deployment
    old = deployments.current(settings, pipeline.name)
    candidate.timings["switched"] = time.time()  # all traffic
    deployments.record(settings, pipeline.name, candidate)
    deployments.record_candidate(settings, pipeline.name, None)
    routes.sync(settings)
    state.status, state.reason, state.requested = PROMOTED, why, ""
    state.settled = False
    state.stops = old.colour if old is not None and old.colour != candidate.colour else ""
    save(settings, state)
    return settle(settings, pipeline, state, log)


def abort(settings: Settings, pipeline: Pipeline, state: State, why: str, log=print) -> Verdict:
    """All traffic back to production at once, then the candidate stopped, and why on its tags."""
    found = deployments.candidate(settings, pipeline.name)
    deployments.record_candidate(settings, pipeline.name, None)
    routes.sync(settings)
    state.status, state.reason, state.requested = ABORTED, why, ""
    state.settled, state.stops = False, found.deployment.colour if found is not None else ""
    save(settings, state)
    return settle(settings, pipeline, state, log)


def settle(settings: Settings, pipeline: Pipeline, state: State, log=print) -> Verdict:
    """What follows a decision once traffic has moved: MLflow's aliases and tags say how the rollout
    ended, then the colour that no longer serves drains and stops. A look that finds a decision not yet
    settled (the one that decided was killed halfway: a task retried under it) settles it again; each
    part may run twice."""
    name = pipeline.name
    if state.status == PROMOTED:
        aliases_name_what_serves(settings, pipeline, state.version)
        serving = deployments.current(settings, name)
        mark(settings, name, state.version, schema.SERVING, f"{serving.group if serving else ''}: {state.reason}")
        _tag(settings, name, state.version, f"{PROMOTED}: {state.reason}")
        outcome = f"v{state.version} promoted: {state.reason}"
    else:
        with MlflowAPI.connect(settings) as mlflow:
            if mlflow.version_by_alias(pipeline.model_name, schema.CANDIDATE) == state.version:
                try:
                    mlflow.delete_alias(pipeline.model_name, schema.CANDIDATE)
                except RuntimeError:  # another look settling at the same moment deleted it first
                    if mlflow.version_by_alias(pipeline.model_name, schema.CANDIDATE) == state.version:
                        raise
        mark(settings, name, state.version, schema.DEPLOY_FAILED, f"rolled back: {state.reason}")
        _tag(settings, name, state.version, f"{ABORTED}: {state.reason}")
        outcome = f"v{state.version} rolled back: {state.reason}"
    if state.stops:
        time.sleep(DRAIN_SECONDS)  # requests in flight on it finish
        deployments.stop_replicas(settings, name, state.stops)
        if state.status == PROMOTED and state.baseline and state.baseline != state.version:
            mark(settings, name, state.baseline, schema.RETIRED, f"replaced by v{state.version} live: {state.reason}")
    state.settled = True
    save(settings, state)
    log(outcome)
    if state.status == PROMOTED:
        return Verdict(PROMOTED, reason=state.reason, deployment=deployment_extra(settings, name))
    return Verdict(ABORTED, reason=f"rolled back: {state.reason}")


def _tag(settings: Settings, pipeline: str, version: str, value: str, key: str = schema.ROLLOUT) -> None:
    with MlflowAPI.connect(settings) as mlflow:
        mlflow.set_version_tag(pipeline, version, key, value)


def deployment_extra(settings: Settings, pipeline: str) -> dict | None:
    d = deployments.current(settings, pipeline)
    if d is None:
        return None
    return {
        "pipeline": d.pipeline,
        "version": d.version,
        "bento_tag": d.bento_tag,
        "colour": d.colour,
        "url": f"{settings.predict_url}/{d.pipeline}/predict",
    }


def orphaned(settings: Settings, pipeline: str, now: float | None = None) -> State | None:
    """A running rollout nobody has judged for ORPHANED_SECONDS (its deploy run died for good)."""
    state = load(settings, pipeline)
    now = time.time() if now is None else now
    if state and state.status == RUNNING and now - state.heartbeat > ORPHANED_SECONDS:
        return state
    return None
