"""The Ray Serve pieces without a cluster: conversation routing, the replicas' deployment options,
`serve deploy`'s argument builder, the flags Ray's proxy cannot honour, reading a load failure from
Ray's status, and the metrics mirror."""

from __future__ import annotations

import asyncio
import pickle
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Counter

pytest.importorskip("ray.serve", reason="the Ray tests need the `ray` extra: pip install -e '.[ray]'")

from specserve.server.cli import main  # noqa: E402
from specserve.server.http.settings import ServerSettings  # noqa: E402
from specserve.server.http.transport import SHUTDOWN_FLUSH_S  # noqa: E402
from specserve.server.ray import deployment as deploy_module  # noqa: E402
from specserve.server.ray.cli import deploy_app  # noqa: E402
from specserve.server.ray.deployment import ReplicaLoadError, ReplicaOptions, load_failure  # noqa: E402
from specserve.server.ray.metrics import CounterMirror  # noqa: E402
from specserve.server.ray.routing import ConversationRouter, conversation_id, rendezvous_order  # noqa: E402


@dataclass
class FakeHTTPRequest:  # what Ray's proxy pickles: an object with the ASGI scope
    asgi_scope: dict


def proxied(headers: dict[str, str]) -> SimpleNamespace:
    scope = {"type": "http", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    return SimpleNamespace(args=[pickle.dumps(FakeHTTPRequest(scope))])


def test_conversation_id_is_read_from_the_proxied_request():
    assert conversation_id(proxied({"X-Conversation-Id": "chat-7", "Accept": "*/*"})) == "chat-7"
    assert conversation_id(proxied({"Accept": "*/*"})) is None
    assert conversation_id(proxied({"X-Conversation-Id": ""})) is None
    assert conversation_id(SimpleNamespace(args=["a handle call", 2])) is None
    assert conversation_id(None) is None


def test_rendezvous_moves_only_the_removed_replicas_keys():
    replicas = ["r1", "r2", "r3"]
    keys = [f"conversation-{i}" for i in range(300)]
    homes = {key: rendezvous_order(key, replicas)[0] for key in keys}
    assert {replicas.index(h) for h in homes.values()} == {0, 1, 2}
    assert all(rendezvous_order(key, list(reversed(replicas)))[0] == homes[key] for key in keys)  # order-free
    after = {key: rendezvous_order(key, ["r1", "r3"])[0] for key in keys}
    moved = [key for key in keys if after[key] != homes[key]]
    assert moved and all(homes[key] == "r2" for key in moved)


def replica(unique_id: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id))


def choose(headers: dict[str, str], candidates: list) -> list[list]:
    router = ConversationRouter.__new__(ConversationRouter)  # choose_replicas reads no router state
    return asyncio.run(router.choose_replicas(candidates, proxied(headers)))


def test_the_router_ranks_every_replica_for_a_conversation_and_two_without():
    candidates = [replica("a"), replica("b"), replica("c")]
    ranks = choose({"X-Conversation-Id": "chat-1"}, candidates)
    assert [[r.replica_id.unique_id for r in rank] for rank in ranks] == [
        [i] for i in rendezvous_order("chat-1", ["a", "b", "c"])]
    plain = choose({}, candidates)
    assert len(plain) == 1 and len(plain[0]) == 2 and set(map(id, plain[0])) <= set(map(id, candidates))
    assert choose({"X-Conversation-Id": "chat-1"}, []) == []


def test_deployment_options_follow_the_flags():
    settings = ServerSettings(max_active=4, max_queue=10)
    fixed = ReplicaOptions(replicas=3, num_cpus=2, shutdown_timeout_s=7).deployment_options(settings)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == 14 and fixed["max_queued_requests"] == 10
    assert fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.0}
    # the replica ends its streams at 7 s; Ray kills it only once their last events have had time to go out
    assert fixed["graceful_shutdown_timeout_s"] == 7 + SHUTDOWN_FLUSH_S
    assert fixed["graceful_shutdown_wait_loop_s"] < 1
    assert fixed["request_router_config"].request_router_class.endswith("ConversationRouter")
    scaled = ReplicaOptions(min_replicas=0, max_replicas=4, route_by="none").deployment_options(settings)
    assert scaled["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 4}
    assert "num_replicas" not in scaled and "request_router_config" not in scaled


@pytest.mark.parametrize("bad", [
    {"replicas": 0}, {"min_replicas": 1}, {"min_replicas": 3, "max_replicas": 2},
    {"min_replicas": 0, "max_replicas": 0}, {"num_gpus": -1}, {"route_by": "prompt"}, {"log_format": "xml"},
])
def test_bad_replica_options_are_refused(bad):
    with pytest.raises(ValueError):
        ReplicaOptions(**bad)


def test_deploy_app_reads_flags_without_dashes(tiny_model_dir):
    app = deploy_app({"model": str(tiny_model_dir), "draft": "ngram", "max-active": 3, "replicas": 2,
                      "num_cpus_per_replica": 0.5, "allowed-origins": ["https://a", "https://b"], "no-ui": True,
                      "allow-remote-images": False})
    deployment = app._bound_deployment
    config, settings, threads, options = deployment.init_args
    assert (config.model, config.draft, threads) == (str(tiny_model_dir), "ngram", 1)
    assert settings.max_active == 3 and settings.allowed_origins == ("https://a", "https://b")
    assert not settings.ui and not settings.allow_remote_images
    assert deployment.num_replicas == 2 and deployment.ray_actor_options["num_cpus"] == 0.5
    assert (options.log_level, options.log_format) == ("info", "plain")  # the replicas log as the flags say
    with pytest.raises(SystemExit):
        deploy_app({"route-by": "prompt"})
    with pytest.raises(SystemExit):
        deploy_app({"header-timeout": 5})


@pytest.mark.parametrize("argv, env, flag", [
    (["--header-timeout", "5"], {}, "--header-timeout"), (["--limit-concurrency", "100"], {}, "--limit-concurrency"),
    ([], {"SPECSERVE_LIMIT_CONCURRENCY": "100"}, "--limit-concurrency"),
])
def test_flags_rays_proxy_cannot_honour_are_refused(argv, env, flag, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["ray-serve", "--model", "/nowhere", *argv]) == 2  # before Ray starts or a model loads
    assert capsys.readouterr().err == (f"specserve: error: {flag} cannot apply under ray-serve: Ray's HTTP proxy "
                                       "serves the connections and has no such limit (set it on a load balancer "
                                       "in front)\n")


def test_help_says_which_serve_flags_ray_serve_refuses(capsys):
    with pytest.raises(SystemExit):
        main(["ray-serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--header-timeout", "--limit-concurrency"):
        assert f"{flag} {flag.upper()[2:].replace('-', '_')} not under ray-serve" in text


def test_a_load_failure_is_read_from_rays_status_message():
    # the shape of Ray's deployment message: its retry note, then the replica's traceback
    message = ("A replica failed to start with exception. Retrying 2 more time(s). Error:\n"
               "Traceback (most recent call last):\n  File \"replica.py\", line 1867, in initialize\n"
               f"specserve.server.ray.deployment.{ReplicaLoadError.__name__}: the model failed to load: "
               "StoreError: /m is a folder but not a Hugging Face model folder (no config.json)\n")
    assert load_failure(message) == ("the model failed to load: StoreError: /m is a folder but not a Hugging Face "
                                      "model folder (no config.json)")
    assert load_failure("Deploying: 1 of 2 replicas running.") is None


class FakeCounter:
    def __init__(self, name: str, description: str, tag_keys: tuple) -> None:
        self.name, self.added = name, []

    def inc(self, value: float, tags: dict) -> None:
        self.added.append((value, tags))


def test_the_mirror_copies_only_what_each_counter_gained():
    registry = CollectorRegistry()
    drafts = Counter("vllm:spec_decode_num_drafts", "", ["model_name"], registry=registry)
    per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos", "", ["model_name", "position"],
                      registry=registry)
    hits = Counter("vllm:prefix_cache_hits", "", ["model_name"], registry=registry)
    Counter("vllm:generation_tokens", "", ["model_name"], registry=registry).labels("m").inc(99)
    made = {}
    mirror = CounterMirror(registry, counter=lambda name, **kw: made.setdefault(name, FakeCounter(name, **kw)))
    drafts.labels("m").inc(5)
    per_pos.labels("m", "0").inc(3)
    hits.labels("m").inc(40)
    mirror.sync()
    drafts.labels("m").inc(2)
    mirror.sync()
    mirror.sync()  # nothing new
    assert made["specserve_spec_decode_num_drafts"].added == [(5, {"model_name": "m"}), (2, {"model_name": "m"})]
    assert made["specserve_spec_decode_num_accepted_tokens_per_pos"].added == [
        (3, {"model_name": "m", "position": "0"})]
    assert made["specserve_prefix_cache_hits"].added == [(40, {"model_name": "m"})]
    assert not any("generation" in name for name in made)


def test_the_documented_serve_deploy_config_builds():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((Path(deploy_module.__file__).parent / "deploy.yaml").read_text())
    (application,) = config["applications"]
    module, name = application["import_path"].split(":")
    assert f"{module}.{name}" == f"{deploy_app.__module__}.{deploy_app.__name__}"
    deployment = deploy_app(application["args"])._bound_deployment
    options = deployment._deployment_config
    assert options.autoscaling_config.max_replicas == 4 and options.graceful_shutdown_timeout_s == 30 + SHUTDOWN_FLUSH_S
    assert deployment.init_args[0].draft == "suffix"
