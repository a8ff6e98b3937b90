"""``tl-plugins bench topk`` (work in progress)."""


def bench_topk(*, quick: bool = False, model: str = "smollm2-135m", device: str = "cpu"):
    raise NotImplementedError("bench topk: not written yet")
