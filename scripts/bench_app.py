"""N concurrent browser requests against one `vqgpt app`: all complete without an error, and the
server's memory (VmRSS) before, at its peak and after each round.

    python scripts/bench_app.py --model runs/demo9/lm [--pages 8 --rounds 3 -n 4]
"""

from __future__ import annotations

import argparse
import threading
import time

from app_browser import app_server, chromium, rss_mb, wait_ready


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--pages", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-n", type=int, default=4, help="images per request")
    args = p.parse_args()
    with app_server(args.model) as (url, proc, up_after), chromium() as browser:
        pages = []
        for _ in range(args.pages):
            page = browser.new_context().new_page()
            page.set_default_timeout(600_000)
            page.goto(url)
            pages.append(page)
        wait_ready(pages[0])
        idle = rss_mb(proc.pid)
        print(f"page served after {up_after:.1f} s; model loaded: RSS {idle:.0f} MB")
        print("| round | requests | ok | wall s | RSS before MB | RSS peak MB | RSS after MB |")
        print("|---|---|---|---|---|---|---|")
        for r in range(1, args.rounds + 1):
            before, peak, done = rss_mb(proc.pid), [], threading.Event()

            def sample(peak=peak, done=done) -> None:
                while not done.is_set():
                    peak.append(rss_mb(proc.pid))
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample)
            sampler.start()
            start = time.monotonic()
            for k, page in enumerate(pages):
                page.locator("#prompts textarea").fill(f"a large red circle at the top left {k}")
                box = page.locator("#n input[type=number]").first
                box.fill(str(args.n))
                box.press("Tab")
                page.locator("#draw").click()
            ok = 0
            for page in pages:
                page.wait_for_function(
                    f"() => document.querySelector('#draw-status').innerText.includes('Error') "
                    f"|| document.querySelectorAll('#gallery img').length >= {args.n}"
                )
                ok += "Error" not in page.locator("#draw-status").inner_text()
            wall = time.monotonic() - start
            done.set()
            sampler.join()
            time.sleep(2)
            after = rss_mb(proc.pid)
            print(
                f"| {r} | {len(pages)} | {ok} | {wall:.1f} | {before:.0f} | "
                f"{max(peak + [before]):.0f} | {after:.0f} |"
            )
            for page in pages:  # a fresh page per round: the gallery starts empty
                page.reload()


if __name__ == "__main__":
    main()
