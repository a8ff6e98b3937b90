"""The topk section of ``tl-plugins report`` (work in progress)."""


def report_section(report) -> None:
    return None
