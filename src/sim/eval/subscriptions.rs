//! Subscriptions (paper Fig. 5): update latency for 100..6,400
//! subscribers, publish through the Scribe-style multicast tree against
//! polling at a fixed interval.
//!
//! The multicast tree core and its simulator are being added to the
//! overlay and the simulator separately; until they are in, this
//! experiment reports that it cannot run rather than measure a stand-in.

use super::{EvalError, EvalOpts, Report};

pub fn run(_opts: &EvalOpts) -> Result<Report, EvalError> {
    Ok(Report {
        name: "subscriptions",
        title: "Subscriptions: update latency, publish vs polling (Fig. 5) — not measured yet"
            .into(),
        data: serde_json::json!({
            "measured": false,
            "reason": "needs the multicast-tree core and its simulator",
        }),
        claims: Vec::new(),
        figures: Vec::new(),
        summary: "Not measured yet: this experiment drives the overlay's multicast-tree \
                  core through the simulator, which this build does not have."
            .into(),
    })
}
