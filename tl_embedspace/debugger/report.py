"""The debugger's section of ``tl-plugins report``: one traced prompt and, per layer, the logit
lens and the dominant sub-updates (score, direct effect on the prediction, promoted tokens)."""

from __future__ import annotations

import html

PROMPT = "The capital of France is"


def report_section(report) -> None:
    import pandas as pd

    from tl_embedspace.debugger.trace import trace
    from tl_embedspace.projections import visible

    try:
        t = trace(report.model, PROMPT, k=3, index=None)
    except Exception as exc:  # noqa: BLE001 - a model the debugger refuses: say so in the section
        report.add_section("LM-Debugger (tl_embedspace.debugger)",
                           html=f"<p>Not traced: {html.escape(str(exc))}</p>", order=45)
        return
    tg = t.targets.iloc[0]
    rows = []
    for L in t.layers.itertuples():
        subs = t.sub_updates[t.sub_updates.layer == L.layer]
        rows.append({
            "layer": L.layer, "after attn": visible(L.mid_top[0]), "after FFN": visible(L.post_top[0]),
            "target rank": L.post_rank, "target p": round(L.post_prob, 4),
            "top-3 share of FFN effect": round(L.topk_direct_share, 2),
            "dominant sub-updates (score, direct effect: promoted)": "; ".join(
                f"{u.label} ({u.score:.2f}, {u.direct_effect:+.2f}: {' '.join(visible(x) for x in u.top_tokens[:3])})"
                for u in subs.itertuples()),
        })
    intro = (f"<p>LM-Debugger trace (Geva et al. 2022) of <code>{html.escape(PROMPT)}</code> at the last position: "
             f"the model predicts <code>{html.escape(visible(tg['prediction']))}</code>. Per layer, the logit lens after "
             "attention and after the FFN, the rank and probability of the prediction, and the three FFN "
             "sub-updates with the largest score |m_i|·||v_i|| with their direct effect on the predicted token's "
             "logit (final norm's scale frozen at the final residual). Run <code>tl-plugins debug --model "
             f"NAME</code> for the interactive version.</p>")
    report.add_section("LM-Debugger (tl_embedspace.debugger)", html=intro, tables=[pd.DataFrame(rows)], order=45)
