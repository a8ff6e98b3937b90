"""``tl-plugins topk ...`` commands (filled in below)."""

import click


@click.group("topk")
def topk_group() -> None:
    """Top-k attention and feed-forward (Gupta et al. 2021)."""
