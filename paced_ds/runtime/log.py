"""What a run prints: one-line messages and progress bars, from rank 0 only."""

from __future__ import annotations

from paced_ds.runtime import dist


def say(message: str) -> None:
    if dist.is_main():
        print(f"paced-ds: {message}", flush=True)


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    """A tqdm bar on rank 0 (``logging.progress``); a silent one elsewhere."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled or not dist.is_main(),
                dynamic_ncols=True)
