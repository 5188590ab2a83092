"""Does conversation affinity help speculation on Ray Serve? Sends each of K prompts R times in a row
(greedy, one request at a time, the prompt's index as `X-Conversation-Id`) to a `specserve ray-serve`
and reports, per repeat, the mean accepted length of the answers and how many went to the replica
that answered that prompt first.

With `--draft suffix` a replica drafts from its own earlier outputs, so a repeat that lands on the
replica that produced the answer before can draft the whole answer; on another replica it cannot.
Run it against `--route-by conversation` and `--route-by none`:

    python benchmarks/ray_affinity.py --base-url http://127.0.0.1:8000 --prompts 8 --repeats 4
"""

from __future__ import annotations

import argparse
import statistics

import httpx

PROMPTS = [
    "Write a short poem about the sea.", "List five uses of a paperclip.", "Explain what a hash table is.",
    "Describe a sunrise in three sentences.", "Give three tips for learning a language.",
    "What is the difference between weather and climate?", "Summarise the plot of Cinderella.",
    "Name four planets and one fact about each.", "How does a bicycle stay upright?",
    "Write a haiku about autumn leaves.", "Why is the sky blue?", "Describe how to make a cup of tea.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    client = httpx.Client(base_url=args.base_url, timeout=600)
    model = client.get("/v1/models").json()["data"][0]["id"]
    lengths: list[list[float]] = [[] for _ in range(args.repeats)]
    at_home = [0] * args.repeats
    for i, prompt in enumerate(PROMPTS[: args.prompts]):
        home = None
        for repeat in range(args.repeats):
            response = client.post("/v1/chat/completions", headers={"X-Conversation-Id": f"prompt-{i}"}, json={
                "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
                "temperature": 0})
            response.raise_for_status()
            replica = response.headers["x-specserve-replica"]
            home = home or replica
            at_home[repeat] += replica == home
            lengths[repeat].append(response.json()["spec_decode"]["mean_accepted_length"])
    print("| repeat | mean accepted length (incl. bonus) | answered by the first replica |")
    print("|---|---|---|")
    for repeat in range(args.repeats):
        print(f"| {repeat + 1} | {statistics.mean(lengths[repeat]):.2f} | {at_home[repeat]}/{args.prompts} |")


if __name__ == "__main__":
    main()
