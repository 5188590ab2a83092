"""`specserve ray-serve`: `specserve serve`'s app on N Ray Serve replicas behind Ray's HTTP proxy, on a
new local Ray instance (or a running cluster with `--ray-address auto`); and `deploy_app`, the same
application for `serve deploy` (see `deploy.yaml`).

It takes every flag of `specserve serve` (engine and app alike; each replica builds the same
`EngineConfig` and `ServerSettings`), except the uvicorn-only `--header-timeout` and
`--limit-concurrency`, which Ray's proxy does not have; `--keep-alive-timeout` becomes the proxy's.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

from ..engine.args import engine_config
from ..http import logs
from ..http.serve import add_serve_arguments, env_defaults, settings_from_args

APP_NAME = "specserve"
logger = logging.getLogger(__name__)


def add_ray_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """`specserve serve`'s flags plus the replicas' (each also read from SPECSERVE_<FLAG>)."""
    add_serve_arguments(parser)
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
    """The bound Ray Serve application the flags describe."""
    from .deployment import ReplicaOptions, build_application

    options = ReplicaOptions(
        replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests, num_cpus=args.num_cpus_per_replica,
        num_gpus=args.num_gpus_per_replica, route_by=args.route_by, shutdown_timeout_s=args.shutdown_timeout,
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
    return application_from_args(parser.parse_args(argv))


def run_ray_serve(args: argparse.Namespace) -> int:
    """Deploy, serve until SIGTERM or SIGINT, then shut Serve down (each replica drains for up to
    `--shutdown-timeout`) and, if this command started it, the Ray instance. Exits 1 when the
    application fails to deploy (e.g. the model cannot load), with Ray's reason."""
    try:
        import ray
        from ray import serve
    except ImportError:
        sys.stderr.write('specserve: error: ray-serve needs Ray Serve: pip install "specserve[ray]"\n')
        return 2
    logs.configure(args.log_level, args.log_format)
    app = application_from_args(args)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": args.host, "port": args.port,
                                  "keep_alive_timeout_s": args.keep_alive_timeout})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # Ray's deploy failure carries the replicas' reasons
            sys.stderr.write(f"specserve: error: the application failed to deploy: {exc}\n")
            return 1
        logger.info("serving on http://%s:%d with Ray Serve (application %r)", args.host, args.port, APP_NAME)
        stop.wait()
        logger.info("shutting down: replicas drain for up to %.0f s", args.shutdown_timeout)
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
