"""`specserve ray-serve`: `specserve serve`'s app on N Ray Serve replicas behind Ray's HTTP proxy, on a
new local Ray instance (or a running cluster with `--ray-address auto`); and `deploy_app`, the same
application for `serve deploy` (see `deploy.yaml`).

It takes every flag of `specserve serve` (engine and app alike; each replica builds the same
`EngineConfig` and `ServerSettings`, and logs as `--log-level` / `--log-format` say), except
`--header-timeout` and `--limit-concurrency`: Ray's HTTP proxy serves the connections and has
neither limit, so giving one is an error. `--keep-alive-timeout` becomes the proxy's.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from typing import Any

from ..engine.args import engine_config
from ..http import logs
from ..http.serve import add_serve_arguments, env_defaults, settings_from_args
from ..http.transport import SHUTDOWN_FLUSH_S

APP_NAME = "specserve"
PROXY_LACKS = {"header_timeout": "--header-timeout", "limit_concurrency": "--limit-concurrency"}  # uvicorn's own
STATUS_POLL_S = 0.5  # how often the command reads the application's status while it deploys or stops
UNDEPLOY_MARGIN_S = 10.0  # beyond the replicas' drain: Ray's own stopping of the actors
logger = logging.getLogger(__name__)


def add_ray_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """`specserve serve`'s flags plus the replicas' (each also read from SPECSERVE_<FLAG>)."""
    add_serve_arguments(parser)
    for action in parser._actions:  # kept, so that giving one is refused rather than unknown
        if action.dest in PROXY_LACKS:
            action.default = None
            action.help = "not under ray-serve: Ray's HTTP proxy has no such limit (giving it is an error)"
    group = parser.add_argument_group("Ray Serve replicas")
    group.add_argument("--replicas", type=int, default=1, help="replicas, each with its own engine")
    group.add_argument("--min-replicas", type=int, default=None,
                       help="autoscaling (with --max-replicas): fewest replicas (0: scale to zero when idle)")
    group.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most replicas")
    group.add_argument("--target-ongoing-requests", type=float, default=None,
                       help="autoscaling: requests per replica Ray aims for (default: --max-active)")
    group.add_argument("--num-cpus-per-replica", type=float, default=1.0,
                       help="CPUs Ray reserves per replica; also the default --threads (default: %(default)s)")
    group.add_argument("--num-gpus-per-replica", type=float, default=0.0,
                       help="GPUs per replica (with --device cuda) (default: %(default)s)")
    group.add_argument("--route-by", default="conversation", choices=["conversation", "none"],
                       help="'conversation': requests with the same X-Conversation-Id header go to the same "
                            "replica while it has room (drafter state such as --draft suffix stays with the "
                            "conversation); 'none': Ray's default (the shorter queue of two random replicas)")
    group.add_argument("--ray-address", default="local",
                       help="'local': start a new Ray instance on this machine and stop it on exit; 'auto' or "
                            "ADDRESS: deploy on a running cluster (default: %(default)s)")
    env_defaults(parser)


def add_ray_serve_parser(sub: Any) -> argparse.ArgumentParser:
    parser = sub.add_parser("ray-serve", help="serve the HTTP API from several engines with Ray Serve "
                                              "(needs the `ray` extra)", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_ray_serve_arguments(parser)
    parser.set_defaults(run=run_ray_serve)
    return parser


def application_from_args(args: argparse.Namespace) -> Any:
    """The bound Ray Serve application the flags describe; ValueError for flags it cannot honour."""
    from .deployment import ReplicaOptions, build_application

    given = [flag for dest, flag in PROXY_LACKS.items() if getattr(args, dest) is not None]
    if given:
        raise ValueError(f"{' and '.join(given)} cannot apply under ray-serve: Ray's HTTP proxy serves the "
                         "connections and has no such limit (set it on a load balancer in front)")
    options = ReplicaOptions(
        replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests, num_cpus=args.num_cpus_per_replica,
        num_gpus=args.num_gpus_per_replica, route_by=args.route_by, shutdown_timeout_s=args.shutdown_timeout,
        log_level=args.log_level, log_format=args.log_format,
    )
    threads = args.threads or max(1, int(args.num_cpus_per_replica))
    return build_application(engine_config(args), settings_from_args(args), threads, options)


def deploy_app(args: dict[str, Any]) -> Any:
    """Ray's application builder for `serve deploy`: `args` are `specserve ray-serve` flags without
    their dashes (`{"model": "smollm2-135m", "max-active": 8, "allow-remote-images": true}`); the
    deployment options of the config file's `deployments:` section override what they imply."""
    argv = []
    for name, value in args.items():
        flag = "--" + str(name).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, *map(str, value if isinstance(value, list) else [value])]
    parser = argparse.ArgumentParser(prog="specserve ray-serve (serve deploy args)")
    add_ray_serve_arguments(parser)
    try:
        return application_from_args(parser.parse_args(argv))
    except ValueError as exc:
        parser.error(str(exc))


def run_ray_serve(args: argparse.Namespace) -> int:
    """Deploy, serve until SIGTERM or SIGINT, then remove the application (each replica drains for up
    to `--shutdown-timeout`) and, if this command started them, Serve and the Ray instance. Exits 1
    with one line when the application cannot run: the first replica whose model fails to load
    (like `specserve serve`, rather than wait for Ray's retries), or Ray's reason."""
    try:
        import ray
        from ray import serve
    except ImportError:
        sys.stderr.write('specserve: error: ray-serve needs Ray Serve: pip install "specserve[ray]"\n')
        return 2
    logs.configure(args.log_level, args.log_format)
    try:
        app = application_from_args(args)
    except ValueError as exc:
        sys.stderr.write(f"specserve: error: {exc}\n")
        return 2
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": args.host, "port": args.port,
                                  "keep_alive_timeout_s": args.keep_alive_timeout})
        try:
            serve.run_many([serve.RunTarget(app, name=APP_NAME, route_prefix="/")],
                           wait_for_applications_running=False)
            failure = wait_until_running(stop)
            if failure is not None:
                sys.stderr.write(f"specserve: error: {failure}\n")
                return 1
            if not stop.is_set():
                logger.info("serving on http://%s:%d with Ray Serve (application %r)", args.host, args.port,
                            APP_NAME)
                stop.wait()
                logger.info("shutting down: replicas drain for up to %.0f s", args.shutdown_timeout)
            return 0
        finally:
            undeploy(args.shutdown_timeout + SHUTDOWN_FLUSH_S + UNDEPLOY_MARGIN_S)
            if args.ray_address == "local":  # on a cluster, Serve and other applications stay
                serve.shutdown()
    finally:
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_until_running(stop: threading.Event) -> str | None:
    """Wait for the application to run; None once it does or `stop` is set, else why it cannot."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    from .deployment import load_failure

    while not stop.wait(STATUS_POLL_S):
        app = serve.status().applications.get(APP_NAME)
        if app is None:
            continue
        if app.status == ApplicationStatus.RUNNING:
            return None
        for deployment in app.deployments.values():
            if (reason := load_failure(deployment.message)) is not None:
                return reason
        if app.status == ApplicationStatus.DEPLOY_FAILED:  # a deployment's message ends with its exception
            causes = [d.message.strip().splitlines()[-1] for d in app.deployments.values() if d.message.strip()]
            return " ".join(["the application failed to deploy:", app.message, *causes])
    return None


def undeploy(timeout_s: float) -> None:
    """Remove the application, waiting up to `timeout_s` for its replicas to drain and stop (Ray's
    own `serve.shutdown` gives them 30 s, which a longer `--shutdown-timeout` would overrun)."""
    from ray import serve

    serve.delete(APP_NAME, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while APP_NAME in serve.status().applications:
        if time.monotonic() > deadline:
            logger.warning("the replicas did not stop within %.0f s; Ray ends them", timeout_s)
            return
        time.sleep(STATUS_POLL_S)
