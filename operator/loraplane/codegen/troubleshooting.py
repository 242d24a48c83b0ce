"""docs/troubleshooting.md, generated from api/reasons.py: every reason with where it shows, what it means and
the fix (`loraplane crds` writes it; a test fails when it is stale)."""

from __future__ import annotations

from loraplane.api.reasons import Reason


def render() -> str:
    """docs/troubleshooting.md as Markdown: one table row per Reason (where/means/fix), sorted by name,
    then where the logs are."""
    out = [
        "# Troubleshooting",
        "",
        "Generated from `operator/loraplane/api/reasons.py` by `loraplane crds`; do not edit by hand.",
        "",
        "Every loraplane object says what is wrong in its status: `kubectl describe ftj|lora|mr NAME` shows the "
        "conditions (`Ready` first) and Events. Look up the condition's `reason` here (FineTuneJobs also carry "
        "it in `status.failure.reason`; each adapter's state per replica is in the pod annotation "
        "`loraplane.io/adapters`).",
        "",
        "| reason | shown on | what it means | what to do |",
        "|---|---|---|---|",
    ]
    for r in sorted(Reason, key=lambda r: r.value):
        out.append(f"| <a id=\"{r.value.lower()}\"></a>`{r.value}` | {r.where} | {r.means} | {r.fix} |")
    out += ["", "## Logs", "",
            "- operator: `kubectl logs -n loraplane-system deploy/loraplane`",
            "- trainer: `kubectl logs -l loraplane.io/finetunejob=NAME` (its last message is in the pod's "
            "termination message)",
            "- vLLM and the loader: `kubectl logs -l loraplane.io/route=NAME -c vllm` / `-c adapter-loader`",
            "- router: `kubectl logs deploy/NAME-router` (no prompt contents unless `router.logPrompts`)", ""]
    return "\n".join(out)
