"""N concurrent browser requests against one `vqgpt app`: all complete without an error, and the
server's memory (VmRSS) before, at its peak and after each round.

    python scripts/bench_app.py --model runs/demo9/lm [--pages 8 --rounds 6 -n 4]

Round 0 warms the server up (first-use allocations, caches); the rounds after it are the
measure: once warm, a round's "after" (2 s past its last result; the server releases memory
once idle) should come back to its "before" (taken once every page is up and the server idle).
"""

from __future__ import annotations

import argparse
import threading
import time

from app_browser import app_server, chromium, rss_mb, wait_ready


def one_round(pages, pid: int, n: int) -> tuple[int, float, float, float, float]:
    """(requests that completed without an error, wall s, RSS MB before, peak, after)."""
    time.sleep(2)
    before, peak, done = rss_mb(pid), [], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(rss_mb(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.monotonic()
    for k, page in enumerate(pages):
        page.locator("#prompts textarea").fill(f"a large red circle at the top left {k}")
        box = page.locator("#n input[type=number]").first
        box.fill(str(n))
        box.press("Tab")
        page.locator("#draw").click()
    ok = 0
    for page in pages:
        page.wait_for_function(
            f"() => document.querySelector('#draw-status').innerText.includes('Error') "
            f"|| document.querySelectorAll('#gallery img').length >= {n}"
        )
        ok += "Error" not in page.locator("#draw-status").inner_text()
    wall = time.monotonic() - start
    done.set()
    sampler.join()
    time.sleep(2)
    return ok, wall, before, max(peak + [before]), rss_mb(pid)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--pages", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6, help="measured rounds, after a warm-up")
    p.add_argument("-n", type=int, default=4, help="images per request")
    args = p.parse_args()
    with app_server(args.model) as (url, proc, up_after), chromium() as browser:
        pages = [browser.new_context().new_page() for _ in range(args.pages)]
        print(f"page served after {up_after:.1f} s")
        print("| round | requests | ok | wall s | RSS before MB | peak MB | after MB | after - before |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        deltas, first_after = [], None
        for r in range(args.rounds + 1):
            for page in pages:  # fresh pages each round: empty galleries, new sessions
                page.set_default_timeout(600_000)
                page.goto(url)
            wait_ready(pages[0])
            ok, wall, before, peak, after = one_round(pages, proc.pid, args.n)
            name = "0 (warm-up)" if r == 0 else str(r)
            print(
                f"| {name} | {len(pages)} | {ok} | {wall:.1f} | {before:.0f} | {peak:.0f} | "
                f"{after:.0f} | {after - before:+.0f} |",
                flush=True,
            )
            if r:
                deltas.append(after - before)
                first_after = after if first_after is None else first_after
        if deltas:
            print(
                f"\nwarm rounds: after - before {min(deltas):+.0f} to {max(deltas):+.0f} MB "
                f"(mean {sum(deltas) / len(deltas):+.1f}); after, round 1 -> {len(deltas)}: "
                f"{first_after:.0f} -> {after:.0f} MB"
            )


if __name__ == "__main__":
    main()
