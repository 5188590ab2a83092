"""Conversation affinity: a Ray Serve request router that sends every request carrying the same
`X-Conversation-Id` header to the same replica while it has room.

Why a header and not the prompt: the router runs in Ray's HTTP proxy before the request body has
been read (the replica streams it from the proxy later), so only the request line and headers are
there to route on. A replica's drafter state that outlives a request (`--draft suffix`: the outputs
of earlier requests) then keeps seeing the same conversation.

The choice is rendezvous hashing: each replica scores `blake2b(conversation id, replica id)` and the
replicas are tried best score first, one rank each. A full replica (its queue at
`max_ongoing_requests`) passes the request to the next rank, and a replica that dies or is added
moves only the conversations it scores best on. Requests without the header get Ray's default
policy: two random replicas, the shorter queue wins.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

CONVERSATION_HEADER = "x-conversation-id"


def conversation_id(pending_request: PendingRequest | None) -> str | None:
    """The `X-Conversation-Id` of a request from Ray's HTTP proxy, whose one argument is its
    `StreamingHTTPRequest` (ASGI scope included) pickled; None for handle calls and requests
    without the header. Only a request whose pickle holds the header's name is unpickled (ASGI
    header names are lower case)."""
    if pending_request is None or len(pending_request.args) != 1:
        return None
    arg = pending_request.args[0]
    if isinstance(arg, bytes):
        if CONVERSATION_HEADER.encode() not in arg:
            return None
        arg = pickle.loads(arg)  # made by this process's proxy, not by the client
    scope: dict[str, Any] | None = getattr(arg, "asgi_scope", None)
    for name, value in (scope or {}).get("headers", ()):
        if name.decode("latin-1").lower() == CONVERSATION_HEADER:
            return value.decode("latin-1") or None
    return None


def rendezvous_order(key: str, replica_ids: list[str]) -> list[str]:
    """`replica_ids` by descending hash score for `key` (highest random weight): the first is the
    key's home; removing a replica changes the home of only the keys it held."""
    def score(replica_id: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=score, reverse=True)


class ConversationRouter(RequestRouter):
    """Rendezvous hashing on `X-Conversation-Id`; power of two choices without it. The base
    `RequestRouter` hands a chosen replica to exactly the request it was chosen for (no FIFO mixin:
    that would give request A's home replica to whichever request waited longest)."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = conversation_id(pending_request)
        if key is None:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        return [[by_id[replica_id]] for replica_id in rendezvous_order(key, list(by_id))]
