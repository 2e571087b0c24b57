//! `hearth machine get`'s timeline: one bar per step on a shared time axis, so the step
//! that took the time shows at a glance. Only the latest run is drawn (steps that follow
//! each other without a pause of more than [`RUN_GAP_MS`], which is longer than a failed
//! step's retry backoff, so the failed tries stay in the drawing); earlier ones are
//! counted.

use hearth::api::pb;

/// A pause longer than this between two steps starts a new run (a stop and a later
/// start). Longer than the longest retry backoff of a failed step (10 s).
pub const RUN_GAP_MS: u64 = 15_000;

/// One row: the step's offset from the run's start and its bar.
#[derive(Debug, PartialEq)]
pub struct Row {
    /// Index into the timings given.
    pub index: usize,
    /// Milliseconds from the run's first step to this one's start.
    pub offset_ms: f64,
    /// The bar, `width` characters: spaces, then the step's span.
    pub bar: String,
}

/// The latest run's rows and how many earlier timings were left out.
pub fn latest_run(timings: &[pb::StepTiming], width: usize) -> (Vec<Row>, usize) {
    let start_us = |t: &pb::StepTiming| t.started_at_ms.saturating_mul(1000);
    let end_us = |t: &pb::StepTiming| start_us(t).saturating_add(t.duration_us);
    // Where the last run begins: after the last pause longer than RUN_GAP_MS.
    let mut first = 0;
    for i in 1..timings.len() {
        let gap_us = start_us(&timings[i]).saturating_sub(end_us(&timings[i - 1]));
        if gap_us > RUN_GAP_MS * 1000 {
            first = i;
        }
    }
    let run = &timings[first..];
    let Some(origin_ms) = run.iter().map(|t| t.started_at_ms).min() else {
        return (Vec::new(), first);
    };
    let origin_us = origin_ms.saturating_mul(1000);
    let span_us = run
        .iter()
        .map(|t| end_us(t).saturating_sub(origin_us))
        .max()
        .unwrap_or(0)
        .max(1);
    let width = width.max(1);
    let rows = run
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let from_us = start_us(t).saturating_sub(origin_us);
            let scale = |us: u64| (us as f64 / span_us as f64 * width as f64) as usize;
            let start = scale(from_us).min(width - 1);
            let length = scale(from_us.saturating_add(t.duration_us))
                .saturating_sub(start)
                .clamp(1, width - start);
            let fill = if t.outcome == "ok" { '█' } else { '░' };
            let mut bar = " ".repeat(start);
            bar.extend(std::iter::repeat_n(fill, length));
            bar.extend(std::iter::repeat_n(' ', width - start - length));
            Row {
                index: first + i,
                offset_ms: from_us as f64 / 1000.0,
                bar,
            }
        })
        .collect();
    (rows, first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(step: &str, started_at_ms: u64, duration_us: u64, ok: bool) -> pb::StepTiming {
        pb::StepTiming {
            step: step.into(),
            direction: "acquire".into(),
            started_at_ms,
            duration_us,
            outcome: if ok { "ok".into() } else { "boom".into() },
        }
    }

    #[test]
    fn the_slow_step_has_the_long_bar_and_bars_follow_each_other() {
        let timings = [
            timing("disk", 1000, 10_000, true),
            timing("vmm", 1010, 80_000, true),
            timing("ready", 1090, 10_000, false),
        ];
        let (rows, earlier) = latest_run(&timings, 10);
        assert_eq!(earlier, 0);
        let bars: Vec<&str> = rows.iter().map(|r| r.bar.as_str()).collect();
        assert_eq!(bars, ["█         ", " ████████ ", "         ░"]);
        assert_eq!(rows[1].offset_ms, 10.0);
        assert!(rows.iter().all(|r| r.bar.chars().count() == 10));
    }

    #[test]
    fn only_the_latest_run_is_drawn() {
        let timings = [
            timing("disk", 1000, 1000, true),
            timing("vmm", 1001, 1000, true),
            // A stop and start a minute later.
            timing("vmm", 61_000, 5000, true),
            timing("ready", 61_005, 5000, true),
        ];
        let (rows, earlier) = latest_run(&timings, 4);
        assert_eq!(earlier, 2);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].index, 2);
        assert_eq!(rows[0].bar, "██  ");
        assert_eq!(rows[1].bar, "  ██");
    }

    #[test]
    fn a_retry_after_its_backoff_stays_in_the_run() {
        let timings = [
            timing("vmm", 1000, 1000, false),
            // Tried again after a 6.4 s backoff.
            timing("vmm", 7401, 1000, true),
        ];
        let (rows, earlier) = latest_run(&timings, 8);
        assert_eq!(earlier, 0);
        assert_eq!(rows.len(), 2);
        assert!(rows[0].bar.starts_with('░'), "{:?}", rows[0].bar);
        assert!(rows[1].bar.ends_with('█'), "{:?}", rows[1].bar);
    }

    #[test]
    fn nothing_recorded_draws_nothing_and_instant_steps_still_show() {
        assert_eq!(latest_run(&[], 10), (Vec::new(), 0));
        let (rows, _) = latest_run(&[timing("publish", 5, 0, true)], 3);
        assert_eq!(rows[0].bar, "█  ");
    }
}
