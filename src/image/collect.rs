//! Which bases to collect: the decision, pure and table-tested; the RootfsCache gathers
//! the facts (sizes, last use, the machines naming each base) and removes the files.
//!
//! A base is never collected while a machine record that is not destroyed names it, nor
//! within `grace_secs` of its last use: a create that has just been given a base has not
//! recorded it yet, and the grace covers that window. Among the others, a base unused for
//! `max_unused_secs` goes; then, while the cache is over its byte budget, the least
//! recently used go first.

/// A base the cache could remove, with what it is known by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The base digest.
    pub digest: String,
    /// Bytes on disk that removing it frees: the base's allocated blocks and the blobs
    /// no other base needs.
    pub freed_bytes: u64,
    /// Last use, seconds since the epoch.
    pub last_used_unix: u64,
    /// Machines (not destroyed) whose records name it.
    pub machines: usize,
}

/// The collection policy (from `[images]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CollectPolicy {
    /// Bytes the bases and blobs may take together; `None`: no budget.
    pub budget_bytes: Option<u64>,
    /// An unreferenced base unused this long is removed; `None`: never for age alone.
    pub max_unused_secs: Option<u64>,
    /// A base used this recently is kept whatever the budget says.
    pub grace_secs: u64,
}

/// Why a base is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Unreferenced and unused for longer than `max_unused_secs`.
    Unused,
    /// Unreferenced, and the cache is over its budget.
    OverBudget,
}

impl Reason {
    /// The word logs and the API use.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unused => "unused",
            Reason::OverBudget => "over budget",
        }
    }
}

/// What to remove, and how far over budget the cache stays (everything left is
/// referenced or within the grace).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Digests to remove, with why, in removal order.
    pub remove: Vec<(String, Reason)>,
    /// Bytes still over the budget after the removals (0 when within it).
    pub still_over_bytes: u64,
}

/// Decides what to collect. `total_bytes` is what bases and blobs take now.
pub fn plan(candidates: &[Candidate], total_bytes: u64, now: u64, policy: CollectPolicy) -> Plan {
    let idle = |c: &Candidate| now.saturating_sub(c.last_used_unix);
    let mut eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.machines == 0 && idle(c) >= policy.grace_secs)
        .collect();
    // Oldest use first; the digest breaks ties so the plan is deterministic.
    eligible.sort_by(|a, b| {
        a.last_used_unix
            .cmp(&b.last_used_unix)
            .then_with(|| a.digest.cmp(&b.digest))
    });
    let mut used = total_bytes;
    let mut remove = Vec::new();
    let mut kept = Vec::new();
    for c in eligible {
        if policy.max_unused_secs.is_some_and(|max| idle(c) >= max) {
            used = used.saturating_sub(c.freed_bytes);
            remove.push((c.digest.clone(), Reason::Unused));
        } else {
            kept.push(c);
        }
    }
    if let Some(budget) = policy.budget_bytes {
        for c in kept {
            if used <= budget {
                break;
            }
            used = used.saturating_sub(c.freed_bytes);
            remove.push((c.digest.clone(), Reason::OverBudget));
        }
    }
    Plan {
        remove,
        still_over_bytes: policy
            .budget_bytes
            .map_or(0, |budget| used.saturating_sub(budget)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(digest: &str, freed: u64, last_used: u64, machines: usize) -> Candidate {
        Candidate {
            digest: digest.into(),
            freed_bytes: freed,
            last_used_unix: last_used,
            machines,
        }
    }

    fn removed(p: &Plan) -> Vec<(&str, Reason)> {
        p.remove.iter().map(|(d, r)| (d.as_str(), *r)).collect()
    }

    const NOW: u64 = 1_000_000;

    #[test]
    fn no_policy_removes_nothing() {
        let cands = [c("a", 10, 0, 0), c("b", 10, 0, 0)];
        let p = plan(&cands, 20, NOW, CollectPolicy::default());
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn age_removes_unreferenced_bases_past_the_limit() {
        let policy = CollectPolicy {
            max_unused_secs: Some(100),
            ..CollectPolicy::default()
        };
        let cands = [
            c("old", 10, NOW - 500, 0),
            c("old-in-use", 10, NOW - 500, 2),
            c("fresh", 10, NOW - 50, 0),
            c("exactly", 10, NOW - 100, 0),
        ];
        let p = plan(&cands, 40, NOW, policy);
        assert_eq!(
            removed(&p),
            [("old", Reason::Unused), ("exactly", Reason::Unused)]
        );
    }

    #[test]
    fn the_budget_removes_least_recently_used_first_until_within() {
        let policy = CollectPolicy {
            budget_bytes: Some(100),
            ..CollectPolicy::default()
        };
        let cands = [
            c("newest", 40, NOW - 10, 0),
            c("oldest", 30, NOW - 300, 0),
            c("middle", 30, NOW - 200, 0),
            c("referenced", 50, NOW - 900, 1),
        ];
        // 150 used, 100 allowed: the oldest two unreferenced go (60 freed -> 90).
        let p = plan(&cands, 150, NOW, policy);
        assert_eq!(
            removed(&p),
            [
                ("oldest", Reason::OverBudget),
                ("middle", Reason::OverBudget)
            ]
        );
        assert_eq!(p.still_over_bytes, 0);
        // Within budget: nothing goes.
        assert!(plan(&cands, 100, NOW, policy).remove.is_empty());
    }

    #[test]
    fn referenced_and_recent_bases_survive_even_over_budget() {
        let policy = CollectPolicy {
            budget_bytes: Some(10),
            max_unused_secs: Some(1),
            grace_secs: 60,
        };
        let cands = [
            c("in-use", 100, NOW - 1000, 1),
            c("just-used", 100, NOW - 30, 0),
            c("idle", 100, NOW - 61, 0),
        ];
        let p = plan(&cands, 300, NOW, policy);
        assert_eq!(removed(&p), [("idle", Reason::Unused)]);
        assert_eq!(p.still_over_bytes, 190);
    }

    #[test]
    fn ties_break_by_digest_and_clocks_going_backwards_do_not_underflow() {
        let policy = CollectPolicy {
            budget_bytes: Some(0),
            ..CollectPolicy::default()
        };
        let cands = [
            c("b", 1, NOW, 0),
            c("a", 1, NOW, 0),
            c("future", 1, NOW + 50, 0),
        ];
        let p = plan(&cands, 3, NOW, policy);
        assert_eq!(
            removed(&p),
            [
                ("a", Reason::OverBudget),
                ("b", Reason::OverBudget),
                ("future", Reason::OverBudget)
            ]
        );
    }
}
